"""TPAModel: logit parity with transformers (Llama, Qwen2, Mistral), with the paper-equation oracle (T6 forms),
and self-consistency of the cache paths (chunked prefill, decode, batches, truncate)."""

from __future__ import annotations

import math

import pytest
import torch

from tpa_core.config import TPAConfig
from tpa_core.convert import hf_llama_family_to_tpa
from tpa_core.errors import TPAError
from tpa_core.generate import prefill
from tpa_core.model import TPAModel

transformers = pytest.importorskip("transformers")

HF_BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, attn_implementation="eager")


def _hf_model(arch: str, **overrides):
    """A seeded random transformers model with weights of unit-scale activations (not the 0.02 init)."""
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM")}
    config_cls, model_cls = (getattr(transformers, name) for name in classes[arch])
    torch.manual_seed(0)
    kwargs = dict(HF_BASE, **overrides)
    attn_impl = kwargs.pop("attn_implementation")
    hf_config = config_cls(**kwargs)
    hf_config._attn_implementation = attn_impl
    model = model_cls(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.normal_(0, 0.5)  # Qwen2's q/k/v biases
            else:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
    return model


def _convert(hf_model) -> TPAModel:
    config = TPAConfig.from_hf_config(hf_model.config.to_dict())
    model = TPAModel(config)
    model.load_state_dict(hf_llama_family_to_tpa(hf_model.state_dict(), config))
    return model.eval()


HF_CASES = {
    "llama-gqa": ("llama", {}),
    "llama-mha-tied-headdim": ("llama", dict(num_key_value_heads=4, head_dim=24, tie_word_embeddings=True)),
    "llama-mqa": ("llama", dict(num_key_value_heads=1)),
    "qwen2-biases": ("qwen2", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", dict(sliding_window=96, head_dim=16)),
    "llama-rope-linear": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-rope-llama3": ("llama", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, max_position_embeddings=512)),
    "llama-rope-yarn": ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 32})),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_logit_parity_with_transformers(helpers, case):
    arch, overrides = HF_CASES[case]
    hf = _hf_model(arch, **overrides)
    ours = _convert(hf)
    torch.manual_seed(1)
    tokens = torch.randint(0, 97, (2, 41))
    with torch.inference_mode():
        want = hf(tokens).logits
        got = ours(tokens)
    assert want.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert (got - want).abs().max().item() <= helpers.TOL["hf_parity"]


def test_dynamic_ntk_parity_beyond_the_original_window(helpers):
    """Dynamic NTK changes the frequencies once the sequence outgrows max_position_embeddings (here 32)."""
    hf = _hf_model("llama", max_position_embeddings=32, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    ours = _convert(hf)
    assert ours.config.max_position_embeddings == 64  # the window the scaling stretches to
    tokens = torch.randint(0, 97, (1, 50))
    with torch.inference_mode():
        want = hf(tokens).logits
        got = ours(tokens)
    assert (got - want).abs().max().item() <= helpers.TOL["hf_parity"]


def test_cached_decode_matches_transformers_greedy(helpers):
    hf = _hf_model("qwen2")
    ours = _convert(hf)
    prompt = torch.randint(0, 97, (1, 17))
    with torch.inference_mode():
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 17:].tolist()
    cache = ours.new_cache(capacity=8)
    logits = prefill(ours, cache, prompt[0], chunk_size=5)
    got = []
    with torch.inference_mode():
        for _ in range(12):
            token = int(logits.argmax())
            got.append(token)
            logits = ours(torch.tensor([[token]]), cache, last_only=True)[0, -1]
    assert got == want


def test_factor_forms_match_the_paper_oracle(helpers, form):
    config = helpers.tiny_config(form)
    model = helpers.random_model(config)
    tokens = torch.randint(0, config.vocab_size, (2, 23))
    with torch.inference_mode():
        got = model(tokens)
    want = helpers.oracle_logits(model, tokens)
    assert want.abs().max() > 1.0
    assert (got.double() - want).abs().max().item() <= helpers.TOL["float32_vs_float64"]


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_one_shot(helpers, form, chunk):
    config = helpers.tiny_config(form)
    model = helpers.random_model(config)
    tokens = torch.randint(0, config.vocab_size, (29,))  # 29 = 4 * 7 + 1: a 1-token last chunk
    one, chunked = model.new_cache(capacity=4), model.new_cache(capacity=4)
    a = prefill(model, one, tokens, chunk_size=64)
    b = prefill(model, chunked, tokens, chunk_size=chunk)
    assert (a - b).abs().max().item() <= helpers.TOL["float32_paths"]
    assert one.length(0) == chunked.length(0) == 29
    ea, eb = one.export(0, 0, 29), chunked.export(0, 0, 29)
    for key in ea:
        assert (ea[key] - eb[key]).abs().max().item() <= helpers.TOL["float32_paths"], key


def test_decode_with_cache_equals_full_forward(helpers, form):
    config = helpers.tiny_config(form)
    model = helpers.random_model(config)
    tokens = torch.randint(0, config.vocab_size, (1, 20))
    with torch.inference_mode():
        full = model(tokens)  # [1, 20, V]
        cache = model.new_cache(capacity=2)
        model(tokens[:, :9], cache)
        for t in range(9, 20):
            step = model(tokens[:, t:t + 1], cache, last_only=True)
            assert (step[0, 0] - full[0, t]).abs().max().item() <= helpers.TOL["float32_paths"], t
    assert cache.length(0) == 20


def test_batch_of_sequences_with_different_lengths(helpers, form):
    config = helpers.tiny_config(form)
    model = helpers.random_model(config)
    lens = [5, 12, 1]
    seqs = [torch.randint(0, config.vocab_size, (1, n + 3)) for n in lens]
    cache = model.new_cache(batch_size=3, capacity=4)
    with torch.inference_mode():
        for b, n in enumerate(lens):
            model(seqs[b][:, :n], cache, seq=b)
        for k in range(3):
            step = torch.cat([s[:, lens[b] + k:lens[b] + k + 1] for b, s in enumerate(seqs)])  # [3, 1]
            logits = model(step, cache)  # [3, 1, V]
            for b, s in enumerate(seqs):
                want = model(s[:, :lens[b] + k + 1])[0, -1]
                assert (logits[b, 0] - want).abs().max().item() <= helpers.TOL["float32_paths"], (b, k)
    assert cache.lengths.tolist() == [n + 3 for n in lens]


def test_truncate_then_redecode_equals_fresh(helpers, form):
    config = helpers.tiny_config(form)
    model = helpers.random_model(config)
    first = torch.randint(0, config.vocab_size, (1, 15))
    other = torch.randint(0, config.vocab_size, (1, 6))
    cache = model.new_cache(capacity=4)
    with torch.inference_mode():
        model(first, cache)
        cache.truncate(0, 9)
        again = torch.cat([first[:, :9], other], dim=1)  # [1, 15]
        got = torch.stack([model(other[:, i:i + 1], cache, last_only=True)[0, 0] for i in range(6)])
        want = model(again)[0, 9:]
    assert (got - want).abs().max().item() <= helpers.TOL["float32_paths"]


def test_context_window_and_bad_input_are_user_errors(helpers):
    config = helpers.tiny_config("fixed", max_position_embeddings=16)
    model = helpers.random_model(config)
    cache = model.new_cache()
    with torch.inference_mode():
        model(torch.zeros(1, 16, dtype=torch.long), cache)
        with pytest.raises(TPAError, match="context window"):
            model(torch.zeros(1, 1, dtype=torch.long), cache)
        with pytest.raises(TPAError, match=r"\[B, N\]"):
            model(torch.zeros(4, dtype=torch.long))
        with pytest.raises(TPAError, match="sequence 3"):
            model(torch.zeros(1, 1, dtype=torch.long), model.new_cache(batch_size=2), seq=3)


def test_hf_config_errors_name_the_problem():
    with pytest.raises(TPAError, match="unsupported architecture"):
        TPAConfig.from_hf_config({"model_type": "gpt2"})
    base = transformers.LlamaConfig(**{k: v for k, v in HF_BASE.items() if k != "attn_implementation"}).to_dict()
    with pytest.raises(TPAError, match="attention_bias"):
        TPAConfig.from_hf_config(dict(base, attention_bias=True))
    with pytest.raises(TPAError, match="rope_scaling"):
        TPAConfig.from_hf_config(dict(base, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}))
    with pytest.raises(TPAError, match="hidden_size"):
        TPAConfig.from_hf_config({k: v for k, v in base.items() if k != "hidden_size"})


def test_conversion_rejects_missing_and_leftover_weights():
    hf = _hf_model("llama")
    config = TPAConfig.from_hf_config(hf.config.to_dict())
    sd = hf.state_dict()
    with pytest.raises(TPAError, match="model.layers.1.mlp.up_proj.weight"):
        hf_llama_family_to_tpa({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}, config)
    with pytest.raises(TPAError, match="does not use"):
        hf_llama_family_to_tpa(dict(sd, **{"model.layers.9.extra.weight": torch.zeros(1)}), config)


def test_config_dict_round_trip_and_t6_config(helpers, form):
    config = helpers.tiny_config(form, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0}, eos_token_ids=(3, 4))
    data = config.to_dict()
    assert data["rope_scaling"]["original_max_position_embeddings"] == config.max_position_embeddings
    assert TPAConfig.from_dict(data) == config
    with pytest.raises(TPAError, match="bogus"):
        TPAConfig.from_dict(dict(data, bogus=1))
    t6 = dict(vocab_size=50304, n_layer=12, n_head=22, head_dim=64, n_embd=768, rank=2, q_rank=12,
              block_size=1024, bias=False, dropout=0.0, using_groupnorm=False, model_type="gpt2")
    full = TPAConfig.from_t6_config(t6)
    assert (full.form, full.q_rank, full.mlp_hidden, full.tie_embeddings, full.norm_has_weight) == \
        ("contextual", 12, 2048, True, False)
    assert TPAConfig.from_t6_config(t6, kv_only=True).form == "kv_only"  # the weights have c_q
    assert TPAConfig.from_t6_config(dict(t6, n_embd=1024), kv_only=True).mlp_hidden == 2730
    with pytest.raises(TPAError, match="using_groupnorm"):
        TPAConfig.from_t6_config(dict(t6, using_groupnorm=True))


def test_transposed_head_follows_weight_updates(helpers):
    """The decode path's [d, V] copy of the LM head is rebuilt when the weights change (load, in-place edit)."""
    config = helpers.tiny_config("fixed")
    model = helpers.random_model(config)
    tokens = torch.randint(0, config.vocab_size, (1, 5))
    first = model(tokens, last_only=True)
    other = helpers.random_model(config, seed=9)
    model.load_state_dict(other.state_dict())
    assert torch.equal(model(tokens, last_only=True), other(tokens, last_only=True))
    assert not torch.allclose(first, other(tokens, last_only=True))
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    assert (model(tokens, last_only=True) - 2 * other(tokens, last_only=True)).abs().max() <= 1e-4


def test_sixteen_bit_model_keeps_residual_norms_and_logits_in_float32(helpers, form, monkeypatch):
    """bf16 weights and cache; the residual stream, the norms and the logits in float32 (tpa_core.model)."""
    from tpa_core import model as model_module

    config = helpers.tiny_config(form)
    f32 = helpers.random_model(config)
    bf16 = TPAModel(config, dtype=torch.bfloat16)
    bf16.load_state_dict(f32.state_dict())
    for name, p in bf16.named_parameters():
        assert p.dtype == (torch.float32 if "norm" in name else torch.bfloat16), name
    residual = []
    block_forward = model_module.Block.forward

    def recording_forward(self, x, *args):
        out = block_forward(self, x, *args)
        residual.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(model_module.Block, "forward", recording_forward)
    tokens = torch.randint(0, config.vocab_size, (2, 23))
    with torch.inference_mode():
        cache = bf16.new_cache(batch_size=2, capacity=24)
        logits = bf16(tokens, cache)  # [2, 23, V]
        step = bf16(tokens[:, :1], cache, last_only=True)  # decode
        want = f32(torch.cat([tokens, tokens[:, :1]], 1))
    assert cache.dtype == torch.bfloat16
    assert residual and set(residual) == {(torch.float32, torch.float32)}
    assert logits.dtype == step.dtype == torch.float32
    assert not torch.equal(logits, logits.bfloat16().float())  # not rounded to 16 bits on the way
    got = torch.cat([logits, step], 1)
    err = float((got - want).norm() / want.norm())
    print(f"bf16 vs float32 logits: relative error {err:.4f}")
    assert err < 0.03  # bf16 matrices round each product to 8 bits: 1.3-1.5% for the three forms
