"""The compiled decode block (tpa_core.fused_decode, tpa_core/csrc/decode_block.cpp) against the module path.

One new token of one sequence of a float32 CPU model with fixed head factors runs one `decode_block` call per
layer; everything else runs the modules. The two must give the same logits and caches to float rounding (and
to the int8 activation rounding of quantized weights), the same greedy tokens, and the plan must follow the
model's weights.
"""

from __future__ import annotations

import pytest
import torch
from test_quant import write_mixed_gguf

from tpa_core import fused_decode
from tpa_core.config import TPAConfig
from tpa_core.loading import load_model
from tpa_core.model import Block, TPAModel
from tpa_core.quant import ops

pytestmark = pytest.mark.skipif(not ops.load_built(), reason="the compiled ops are not built on this machine")


def _config(**overrides) -> TPAConfig:
    base = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=6, head_dim=16, k_rank=2, v_rank=2, mlp_hidden=80,
                contextual_kv=False, max_position_embeddings=1024)
    base.update(overrides)
    return TPAConfig(**base)


def _random_model(config: TPAConfig, seed: int = 0) -> TPAModel:
    torch.manual_seed(seed)
    model = TPAModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif param.dim() == 1:  # biases
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param) / param.shape[-1] ** 0.5)
    return model


def _decode(model: TPAModel, prompt: list[int], steps: int, *, fused: bool, capacity: int = 8
            ) -> tuple[torch.Tensor, list[int], dict[str, torch.Tensor]]:
    """Prefill `prompt` (module path), then `steps` greedy single-token steps with the fused path on (where a
    block's modules must not run) or off: (logits of every step `[steps, V]`, the tokens, the cache storage)."""
    model.fused_decode = fused
    cache = model.new_cache(capacity=capacity)
    token = int(model(torch.tensor([prompt]), cache, last_only=True)[0, -1].argmax())
    logits, tokens = [], []
    with pytest.MonkeyPatch.context() as patch:
        if fused:
            patch.setattr(Block, "forward", _refuse)
        for _ in range(steps):
            step = model(torch.tensor([[token]]), cache)[0, -1]  # [V]
            token = int(step.argmax())
            logits.append(step)
            tokens.append(token)
    length = cache.length(0)
    return torch.stack(logits), tokens, {name: s[:, :, :length].clone() for name, s in cache.storage.items()}


def _refuse(*args, **kwargs):
    raise AssertionError("a decode step ran a block's modules, not the fused block")


@pytest.mark.parametrize("overrides", [
    {},  # D = 16: the portable attention loops
    {"head_dim": 64},  # the register tiles of the AVX-512 attention, where the CPU has it: 3 heads in one tile
    {"head_dim": 128, "n_heads": 10},  # 5 heads per group: tiles of 2, 2 and 1
    {"head_dim": 12, "qkv_bias": True},  # Qwen2's biases
    {"norm_has_weight": False, "norm_eps": None, "rope_style": "t6", "k_rank": 1, "v_rank": 1},  # MQA, T6 norms
    {"n_heads": 4, "k_rank": 4, "v_rank": 4, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},  # MHA
], ids=["gqa", "gqa-d64", "gqa-d128", "qwen2-bias-d12", "mqa-t6-norms", "mha-linear-rope"])
def test_float_model_decodes_as_the_module_path(overrides):
    model = _random_model(_config(**overrides))
    prompt = [(7 * i + 3) % 97 for i in range(300)]  # more than one 256-position chunk of the attention
    expected = _decode(model, prompt, steps=6, fused=False, capacity=512)
    assert fused_decode.plan_for(model) is not None
    logits, tokens, storage = _decode(model, prompt, steps=6, fused=True, capacity=512)
    torch.testing.assert_close(logits, expected[0], rtol=1e-5, atol=1e-5)
    assert tokens == expected[1]
    for name in storage:
        torch.testing.assert_close(storage[name], expected[2][name], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ops.packs_fast(), reason="this CPU keeps the file's layout (no AVX-512 packed kernel)")
def test_quantized_mixed_model_decodes_as_the_module_path(tmp_path):
    path = tmp_path / "mixed.gguf"
    write_mixed_gguf(path)  # q|k|v in Q4_K / Q5_K / Q6_K, o Q4_0, gate|up Q5_0 / Q4_1, down Q5_1
    model = load_model(path, tmp_path / "models", device="cpu", weights="quantized").model
    prompt = [5, 17, 42, 99, 7, 3, 250, 11, 64, 120, 33, 8]
    expected = _decode(model, prompt, steps=8, fused=False, capacity=32)
    logits, tokens, storage = _decode(model, prompt, steps=8, fused=True, capacity=32)
    spread = float(expected[0].max() - expected[0].min())
    # the same integer products; a norm rounded otherwise can move an int8 activation by one level
    assert (logits - expected[0]).abs().max() <= 1e-3 * spread
    assert tokens == expected[1]
    for name in storage:
        scale = float(expected[2][name].abs().max())
        torch.testing.assert_close(storage[name], expected[2][name], rtol=0, atol=1e-3 * scale)


@pytest.mark.parametrize("overrides", [{}, {"head_dim": 64}, {"head_dim": 128, "n_heads": 10}],
                         ids=["gqa", "gqa-d64", "gqa-d128"])
def test_a_float16_cache_decodes_as_the_module_path(overrides):
    model = _random_model(_config(**overrides))
    model.cache_dtype = torch.float16
    prompt = [(7 * i + 3) % 97 for i in range(300)]
    expected = _decode(model, prompt, steps=6, fused=False, capacity=512)
    logits, tokens, storage = _decode(model, prompt, steps=6, fused=True, capacity=512)
    assert all(s.dtype == torch.float16 for s in storage.values())
    torch.testing.assert_close(logits, expected[0], rtol=1e-5, atol=1e-5)
    assert tokens == expected[1]
    for name in storage:  # both round to nearest even; float32 sums in another order can tip one half-ulp
        torch.testing.assert_close(storage[name].float(), expected[2][name].float(), rtol=1e-3, atol=1e-3)


def test_a_float16_cache_changes_decode_by_its_rounding_only():
    model = _random_model(_config(head_dim=64))
    prompt = [(5 * i + 1) % 97 for i in range(200)]
    wide = _decode(model, prompt, steps=6, fused=True, capacity=256)
    model.cache_dtype = torch.float16
    narrow = _decode(model, prompt, steps=6, fused=True, capacity=256)
    spread = float(wide[0].max() - wide[0].min())
    # keys and values rounded to 11 significant bits: relative error 2^-11 per value
    assert (narrow[0] - wide[0]).abs().max() <= 5e-3 * spread
    for name in wide[2]:  # layer 0's factors are the same values rounded (prefill and the fused steps alike)
        assert torch.equal(narrow[2][name][0], wide[2][name][0].half())
        scale = float(wide[2][name].abs().max())  # later layers also see the rounded attention before them
        torch.testing.assert_close(narrow[2][name].float(), wide[2][name], rtol=0, atol=5e-3 * scale)


def test_one_sequence_of_a_batch_cache_is_written_alone():
    model = _random_model(_config())
    caches = {}
    for fused in (False, True):
        model.fused_decode = fused
        cache = model.new_cache(batch_size=2, capacity=16)
        model(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), cache)
        out = model(torch.tensor([[9]]), cache, seq=1)
        caches[fused] = (out, cache.lengths.tolist(), {n: s.clone() for n, s in cache.storage.items()})
    torch.testing.assert_close(caches[True][0], caches[False][0], rtol=1e-5, atol=1e-5)
    assert caches[True][1] == caches[False][1] == [4, 5]
    for name in caches[True][2]:
        torch.testing.assert_close(caches[True][2][name], caches[False][2][name], rtol=1e-5, atol=1e-5)


def test_the_plan_follows_the_weights():
    model = _random_model(_config())
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    _decode(model, prompt, steps=1, fused=True)
    first = fused_decode.plan_for(model)
    assert fused_decode.plan_for(model) is first  # unchanged weights: the same plan
    with torch.no_grad():
        model.layers[1].mlp.w_down.mul_(-2.0)  # in place: the parameter's version moves
    assert fused_decode.plan_for(model) is not first
    torch.testing.assert_close(_decode(model, prompt, steps=3, fused=True)[0],
                               _decode(model, prompt, steps=3, fused=False)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_of", [
    lambda: _random_model(_config(contextual_kv=True, q_rank=2)),  # contextual TPA: factor-space attention
    lambda: _random_model(_config()).to(torch.bfloat16),  # a 16-bit model
], ids=["contextual", "bfloat16"])
def test_models_the_block_does_not_cover_run_their_modules(model_of):
    assert fused_decode.plan_for(model_of()) is None


def test_a_forced_attention_backend_runs_the_modules():
    model = _random_model(_config())
    model.attention_backend = "triton"
    assert fused_decode.plan_for(model) is None
    model.attention_backend = "auto"
    assert fused_decode.plan_for(model) is not None


def test_the_op_refuses_arguments_that_do_not_fit():
    model = _random_model(_config())
    plan = fused_decode.plan_for(model)
    block = plan.blocks[0]
    cache = model.new_cache(capacity=4)
    keys, values = cache.storage["bk"][0, 0], cache.storage["bv"][0, 0]  # [4, G, D]
    x, cos, sin = torch.zeros(48), torch.ones(16), torch.zeros(16)

    def call(**changes):
        args = dict(x=x, attn_norm=block.attn_norm, mlp_norm=block.mlp_norm, eps=1e-6, weights=block.weights,
                    types=block.types, levels=block.levels, parts=block.parts, bias=block.bias, keys=keys,
                    values=values, pos=0, cos=cos, sin=sin, heads=6, scale=0.25)
        args.update(changes)
        torch.ops.tpa_gguf.decode_block(*args.values())

    call()  # the arguments as the plan gives them
    with pytest.raises(RuntimeError, match="position 4 outside the cache's 4 tokens"):
        call(pos=4)
    with pytest.raises(RuntimeError, match="q\\|k\\|v has 96 rows, the block needs 160"):
        call(weights=[block.weights[0][:96], *block.weights[1:]])
    with pytest.raises(RuntimeError, match="x must be a contiguous float32 CPU vector"):
        call(x=torch.zeros(48, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="5 heads over 2 groups"):
        call(heads=5)
    with pytest.raises(RuntimeError, match="part counts add up to 5"):
        call(parts=[2, 1, 1, 1])
