"""tpa_core.quant: Q4_1 blocks -> torch's CPU int4 kernel, exactly where the kernel allows; 4-bit decoding.

Tolerances (one table, a reason each):
- splitting Q4_1 blocks: exact (d * q + m must equal gguf's dequantization bit for bit).
- packing: exact for the codes; with scales and zeros that bfloat16 holds exactly, the kernel's weight equals
  the float32 one bit for bit. Otherwise the kernel's bfloat16 scale/zero and output rounding bound the error:
  |w_kernel - w| <= 8 |d - bf16(d)| + |z - bf16(z)| + 2^-8 |w_kernel| (the last: bfloat16 output rounding).
- Q8_0 as two 4-bit halves: split exact; |w_kernel - w| <= |q| |d - bf16(d)| + 2^-8 (|w| + 32 d) (each half's
  output rounds on its own; the high half is at most |w| + 15 d).
- prefill with packed weights present: exact (prefill runs the float32 weights).
- logits of a tiny Q4_1 model, 4-bit decode vs float32 decode: <= 3e-2 * max |logit| (bfloat16 activations in
  every projection of 2 layers; measured 1.8e-3).
- the real default model: greedy tokens equal to float32's (24 tokens, the parity prompts).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import write_tiny_gguf

from tpa_core import registry
from tpa_core.errors import TPAError
from tpa_core.generate import GenerationConfig, generate, prefill
from tpa_core.loading import load_model
from tpa_core.quant import (
    GROUP_SIZE,
    attach_q4,
    dequantize_q4_1,
    dequantize_q8_0,
    pack_q4,
    pack_q8_0,
    split_q4_1,
    split_q8_0,
)

gguf = pytest.importorskip("gguf")


def _q4_1_bytes(array: np.ndarray) -> np.ndarray:
    return gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q4_1)


@pytest.mark.parametrize("rows, cols", [(1, 32), (7, 96), (33, 160)])
def test_split_reproduces_gguf_dequantization_exactly(rows, cols):
    array = np.random.default_rng(rows).standard_normal((rows, cols)).astype(np.float32) * 0.3
    raw = _q4_1_bytes(array)
    codes, d, m = split_q4_1(raw, rows, cols)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1).reshape(rows, cols)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert torch.equal(dequantize_q4_1(codes, d, m), torch.from_numpy(np.ascontiguousarray(expected)))


def test_packing_is_exact_when_bfloat16_holds_the_scales():
    """Scales and zeros with few significant bits: the kernel's weight is the float32 Q4_1 weight, bit for bit
    (this checks the code packing, the group layout and the (q - 8) * scale + zero convention)."""
    g = torch.Generator().manual_seed(0)
    N, K = 48, 4 * GROUP_SIZE
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    d = 2.0 ** -torch.randint(4, 9, (N, K // GROUP_SIZE), generator=g).float()  # powers of two
    m = -torch.randint(0, 64, (N, K // GROUP_SIZE), generator=g).float() / 64  # 6 significant bits
    packed = pack_q4(codes, d, m)
    assert packed.packed.shape == (N, K // 2) and packed.scales_zeros.shape == (K // GROUP_SIZE, N, 2)
    assert torch.equal(packed.dequantize(), dequantize_q4_1(codes, d, m))


def test_packing_error_is_the_bfloat16_rounding_of_scale_and_zero():
    rows, cols = 48, 192
    array = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32) * 0.05
    codes, d, m = split_q4_1(_q4_1_bytes(array), rows, cols)
    w = dequantize_q4_1(codes, d, m)
    w_kernel = pack_q4(codes, d, m).dequantize()
    z = m + 8 * d
    bound = (8 * (d - d.bfloat16().float()).abs() + (z - z.bfloat16().float()).abs())  # [N, K/G]
    bound = bound.repeat_interleave(GROUP_SIZE, dim=1) + w_kernel.abs() * 2.0 ** -8 + 1e-12  # [N, K]
    assert ((w_kernel - w).abs() <= bound).all()
    assert not torch.equal(w_kernel, w)  # float16 scales do not all fit bfloat16: the error is real


def test_q8_0_split_and_two_half_packing():
    """Q8_0 (the default model's token embedding = tied LM head): the split is exact; the two 4-bit halves give
    d * q bit for bit when d fits bfloat16, and within the bfloat16 rounding of d and of each half's output else."""
    rows, cols = 32, 96
    array = np.random.default_rng(2).standard_normal((rows, cols)).astype(np.float32)
    raw = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
    codes, d = split_q8_0(raw, rows, cols)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(rows, cols)
    w = dequantize_q8_0(codes, d)
    assert torch.equal(w, torch.from_numpy(np.ascontiguousarray(expected)))
    exact_d = 2.0 ** -torch.randint(3, 9, d.shape, generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(pack_q8_0(codes, exact_d).dequantize(), dequantize_q8_0(codes, exact_d))
    w_kernel = pack_q8_0(codes, d).dequantize()
    q = codes.float()
    bound = (d - d.bfloat16().float()).abs().repeat_interleave(GROUP_SIZE, dim=1) * q.abs()  # [N, K]
    bound += (w.abs() + 32 * d.repeat_interleave(GROUP_SIZE, dim=1)) * 2.0 ** -8  # both halves' output rounding
    assert ((w_kernel - w).abs() <= bound).all()
    x = torch.randn(3, cols)
    assert torch.allclose(pack_q8_0(codes, exact_d)(x), x @ dequantize_q8_0(codes, exact_d).t(), rtol=2e-2,
                          atol=2e-2 * float((x @ w.t()).abs().max()))


def test_pack_rejects_what_the_kernel_cannot_hold():
    with pytest.raises(TPAError):
        pack_q4(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 3), torch.ones(16, 3))
    with pytest.raises(TPAError, match="multiples of 16"):
        pack_q4(torch.zeros(24, 64, dtype=torch.uint8), torch.ones(24, 2), torch.ones(24, 2))


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("q4")
    path = root / "tiny-q4_1.gguf"
    write_tiny_gguf(path, arch="llama", qtype="Q4_1")
    return path, root / "models"


def test_tiny_model_decodes_with_packed_weights(tiny_q4):
    path, models = tiny_q4
    base = load_model(path, models, device="cpu")
    q4 = load_model(path, models, device="cpu", weights="q4")
    assert base.weights == "float32" and q4.weights == "q4"
    layers = base.config.n_layers
    assert all(set(b.attn.packed) == {"w_in", "w_o"} and set(b.mlp.packed) == {"w_gate_up", "w_down"}
               for b in q4.model.layers)
    assert q4.model.packed_head is None  # its token_embd is Q4_1, but 271 rows are not a multiple of 16
    assert not any(b.attn.packed or b.mlp.packed for b in base.model.layers) and layers == 2
    ids = [5, 70, 200, 31, 9, 140, 77]
    caches = [m.model.new_cache(capacity=16) for m in (base, q4)]
    # Prefill (7 rows) runs on the float32 weights in both: identical logits and factors.
    first = [prefill(m.model, c, ids) for m, c in zip((base, q4), caches)]
    assert torch.equal(first[0], first[1])
    assert torch.equal(caches[0].export(0, 0, len(ids))["layers.1.bk"], caches[1].export(0, 0, len(ids))["layers.1.bk"])
    step = torch.tensor([[int(first[0].argmax())]])
    logits = [m.model(step, c, last_only=True)[0, -1] for m, c in zip((base, q4), caches)]
    scale = logits[0].abs().max()
    assert (logits[1] - logits[0]).abs().max() <= 3e-2 * scale
    assert not torch.equal(logits[0], logits[1])  # the decode step did run the packed weights


def test_packed_copies_are_kept_in_the_model_cache(tiny_q4, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from tpa_core import quant

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, arch="qwen2", qtype="Q4_1", seed=5)
    first = load_model(path, tmp_path / "models", device="cpu", weights="q4")
    stored = first.cache_dir / quant.PACKED_FILE
    assert stored.is_file()
    calls = []
    real_attach = quant.attach_q4
    monkeypatch.setattr(quant, "attach_q4", lambda *a: calls.append(a) or real_attach(*a))
    again = load_model(path, tmp_path / "models", device="cpu", weights="q4")
    assert calls == [] and again.weights == "q4"  # from the file, no packing
    for a, b in zip(first.model.layers, again.model.layers):
        for key in ("w_in", "w_o"):
            assert torch.equal(a.attn.packed[key].packed, b.attn.packed[key].packed)
            assert torch.equal(a.attn.packed[key].scales_zeros, b.attn.packed[key].scales_zeros)
        assert set(b.mlp.packed) == {"w_gate_up", "w_down"}
    # A file that does not fit the model (here: one matrix with the wrong shape) is packed again.
    state = quant.packed_state(first.model)
    state["layers.0.attn.w_o.packed"] = state["layers.0.attn.w_o.packed"][:16].clone()
    save_file({k: v.contiguous() for k, v in state.items()}, str(stored),
              metadata={"format": quant.PACKED_FORMAT, "torch": torch.__version__})
    third = load_model(path, tmp_path / "models", device="cpu", weights="q4")
    assert len(calls) == 1 and third.weights == "q4"
    assert torch.equal(third.model.layers[0].attn.packed["w_o"].packed, first.model.layers[0].attn.packed["w_o"].packed)


def test_q4_refuses_what_it_cannot_run(tiny_q4, tmp_path):
    path, models = tiny_q4
    with pytest.raises(TPAError, match="weights mode"):
        load_model(path, models, device="cpu", weights="int4")
    with pytest.raises(TPAError, match="CPU in float32"):
        load_model(path, models, device="cpu", dtype=torch.float16, weights="q4")
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, arch="llama", qtype="Q4_1", seed=3)
    model = load_model(path, models, device="cpu").model
    with pytest.raises(TPAError, match="do not reproduce"):
        attach_q4(model, other)


def test_non_q4_1_sources_stay_float32(tmp_path):
    path = tmp_path / "tiny-f32.gguf"
    write_tiny_gguf(path, arch="qwen2", qtype="F32")
    loaded = load_model(path, tmp_path / "models", device="cpu", weights="q4")
    assert loaded.weights == "float32" and loaded.model.packed_head is None
    assert not any(b.attn.packed or b.mlp.packed for b in loaded.model.layers)


@pytest.mark.slow
def test_default_model_decode_agrees_with_float32_teacher_forced():
    """On the real default model (if the test cache holds it): along the float32 path's greedy answers to the
    parity prompts, 4-bit decode steps pick the same next token at >= 97% of positions (teacher forced, so one
    near-tie does not fork the rest). Exact equality is not the contract: the int4 kernel rounds differently on
    different CPUs (AVX2 vs AVX-512)."""
    from test_default_model import CONVERSATIONS, RAW_PROMPTS

    root = Path(os.environ.get("TPA_RAG_TEST_MODELS", Path.home() / ".cache" / "tpa-rag-test-models"))
    models = root / "data" / "models"
    if not registry.is_fetched(registry.DEFAULT_MODEL, models):
        pytest.skip(f"the default model is not in the test model cache {models}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = load_model(registry.DEFAULT_MODEL, models, device="cpu")
        q4 = load_model(registry.DEFAULT_MODEL, models, device="cpu", weights="q4")
        assert q4.weights == "q4" and q4.model.packed_head is not None  # token_embd is Q8_0
        prompts = [base.tokenizer.encode(p) for p in RAW_PROMPTS]
        prompts += [base.tokenizer.encode_chat(c) for c in CONVERSATIONS]
        # A prefill runs the float32 weights, the LM head included: the first token's logits are float32's.
        logits = [prefill(m.model, m.model.new_cache(capacity=64), prompts[0]) for m in (base, q4)]
        assert torch.equal(logits[0], logits[1])
        config = GenerationConfig(max_new_tokens=24, temperature=0.0)
        agree = total = 0
        for ids in prompts:
            answer = [t for e in generate(base.model, base.tokenizer, ids, config) for t in e.token_ids]
            picks = []
            for m in (base, q4):
                cache = m.model.new_cache(capacity=len(ids) + len(answer))
                steps = [prefill(m.model, cache, ids)]
                steps += [prefill(m.model, cache, [t], chunk_size=1) for t in answer[:-1]]  # one-row decode
                picks.append([int(step.argmax()) for step in steps])
            assert picks[0] == answer  # the float32 steps reproduce its own greedy answer
            agree += sum(a == b for a, b in zip(*picks))
            total += len(answer)
        assert agree / total >= 0.97, f"4-bit decode agrees with float32 at {agree} of {total} positions"
    finally:
        torch.set_num_threads(threads)
