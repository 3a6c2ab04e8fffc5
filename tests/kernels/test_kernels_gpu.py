"""The Triton kernels on a CUDA GPU (skipped without one): bf16 numerics, the split merge, no recompilation."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import TOLERANCES, decode_config, make_inputs, prefill_config, rel_err
from kernel_oracle import oracle_attention

from flashtpa.inputs import AttentionInputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# form, B, N, H, D, T_cap, kv_lens, (R_Q, R_K, R_V)
BF16_CASES = [
    ("contextual", 2, 1, 32, 64, 5000, [4999, 1234], (16, 1, 1)),
    ("contextual", 3, 1, 34, 64, 3000, [3000, 17, 2049], (6, 2, 2)),
    ("contextual", 1, 1, 78, 64, 40000, [40000], (6, 2, 2)),
    ("kv_only", 2, 1, 47, 64, 2000, [1999, 300], (0, 2, 2)),
    ("fixed", 2, 1, 9, 64, 6000, [6000, 777], (0, 3, 3)),
    ("fixed", 1, 1, 32, 128, 9000, [9000], (0, 8, 8)),
    ("contextual", 2, 200, 32, 64, 1500, [1500, 200], (16, 1, 1)),
    ("contextual", 1, 300, 61, 64, 300, [300], (6, 2, 2)),
    ("kv_only", 1, 129, 29, 64, 700, [650], (0, 2, 2)),
    ("fixed", 2, 257, 9, 64, 800, [800, 257], (0, 3, 3)),
    ("contextual", 1, 2100, 32, 64, 2100, [2100], (16, 1, 1)),  # queries built before the kernel (default)
]


def _args(form, B, N, H, D, T_cap, lens, ranks, dtype=torch.bfloat16):
    R_Q, R_K, R_V = ranks
    return make_inputs(form=form, B=B, N=N, H=H, D=D, T_cap=T_cap, kv_lens=lens, R_Q=max(R_Q, 1), R_K=R_K,
                       R_V=R_V, dtype=dtype, device="cuda", seed=N + H)


@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: f"{c[0]}-B{c[1]}N{c[2]}H{c[3]}D{c[4]}T{c[5]}")
def test_bf16_against_float64(case) -> None:
    from flashtpa.dispatch import attention

    args = _args(*case)
    out = attention(**args)  # auto = triton on CUDA
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert rel_err(out, oracle_attention(AttentionInputs(**args))) <= TOLERANCES[torch.bfloat16]


# Decode launches other than the defaults (head tiles, rank-1 factors loaded in their block, waves, blocks):
# form, B, H, T_cap, kv_lens, (R_Q, R_K, R_V), config fields (`kernel_inputs.decode_config`)
VARIANT_CASES = [
    ("contextual", 2, 78, 20000, [20000, 4097], (6, 2, 2), dict(head_tile=16, block_t=64)),
    ("contextual", 1, 34, 30000, [29999], (6, 2, 2), dict(head_tile=32, block_t=32)),
    ("contextual", 2, 32, 40000, [40000, 33333], (16, 1, 1), dict(head_tile=16, waves=4)),
    ("contextual", 1, 32, 40000, [32769], (16, 1, 1), dict(waves=1, block_t=64, num_stages=4)),
    ("contextual", 1, 32, 40000, [39000], (16, 1, 1), dict(prefetch=False)),
    ("kv_only", 2, 61, 5000, [5000, 4999], (0, 2, 2), dict(head_tile=16, block_t=64)),
    # slices of whole 256-token multiples; many slices (the merge splits D)
    ("contextual", 2, 32, 60000, [60000, 4000], (16, 1, 1), dict(min_chunk=256)),
    ("contextual", 1, 34, 60000, [59999], (6, 2, 2), dict(num_splits=700, min_chunk=64)),
    # the merge launched the usual way after the factor kernel, as a programmatic dependent after the GQA kernel
    ("contextual", 2, 32, 30000, [30000, 77], (16, 1, 1), dict(pdl=False)),
    ("fixed", 2, 32, 30000, [30000, 5000], (0, 8, 8), dict(pdl=True)),
    # token factors through per-thread pointer loads instead of TMA (the default on Hopper)
    ("contextual", 2, 34, 20000, [20000, 3001], (6, 2, 2), dict(tma=False)),
    ("fixed", 2, 32, 30000, [30000, 5001], (0, 8, 8), dict(tma=False)),
]


@pytest.mark.parametrize("case", VARIANT_CASES, ids=lambda c: f"{c[0]}-B{c[1]}H{c[2]}-" +
                         ",".join(f"{k}={v}" for k, v in c[6].items()))
def test_decode_variants_bf16_against_float64(case) -> None:
    from flashtpa.triton_decode import decode_attention

    form, B, H, T_cap, lens, ranks, fields = case
    x = AttentionInputs(**_args(form, B, 1, H, 64, T_cap, lens, ranks))
    out = decode_attention(x, 64 ** -0.5, decode_config(x, **fields))
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert rel_err(out, oracle_attention(x)) <= TOLERANCES[torch.bfloat16]


# Prefill launches other than the defaults: form, B, N, H, T_cap, kv_lens, (R_Q, R_K, R_V), config fields
PREFILL_VARIANT_CASES = [
    ("contextual", 1, 257, 34, 700, [650], (6, 2, 2), {}),
    ("kv_only", 1, 200, 29, 600, [600], (0, 2, 2), {}),
    # factored queries built in every (query tile, head) program (the default below 256 new tokens)
    ("contextual", 2, 300, 32, 1000, [1000, 300], (16, 1, 1), dict(prebuild_queries=False)),
    ("contextual", 1, 2500, 34, 2600, [2600], (6, 2, 2), {}),
    ("contextual", 2, 300, 32, 1000, [1000, 300], (16, 1, 1), dict(tma=False)),
    ("fixed", 1, 500, 32, 900, [900], (0, 8, 8), dict(tma=False)),
]


@pytest.mark.parametrize("case", PREFILL_VARIANT_CASES, ids=lambda c: f"{c[0]}-N{c[2]}H{c[3]}-" +
                         ",".join(f"{k}={v}" for k, v in c[7].items()))
def test_prefill_variants_bf16_against_float64(case) -> None:
    from flashtpa.triton_prefill import prefill_attention

    form, B, N, H, T_cap, lens, ranks, fields = case
    x = AttentionInputs(**_args(form, B, N, H, 64, T_cap, lens, ranks))
    out = prefill_attention(x, 64 ** -0.5, prefill_config(x, **fields))
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert rel_err(out, oracle_attention(x)) <= TOLERANCES[torch.bfloat16]


@pytest.mark.parametrize("form", ["contextual", "fixed"])
def test_float32_matches_torch_backend(form: str) -> None:
    from flashtpa.dispatch import attention

    for N in (1, 37):
        args = _args(form, 2, N, 12, 64, 3000, [2999, 1000], (6, 2, 2) if form == "contextual" else (0, 3, 3),
                     dtype=torch.float32)
        tri = attention(**args, backend="triton")
        ref = attention(**args, backend="torch")
        assert rel_err(tri, ref) <= TOLERANCES[torch.float32]


def test_logit_gap_of_1000_between_splits_is_finite() -> None:
    from flashtpa.triton_decode import decode_attention

    M = 1 << 16
    args = _args("kv_only", 1, 1, 4, 64, M, [M], (0, 1, 1))
    args["q"].fill_(1.0)
    args["ak"].fill_(1.0)
    args["av"].fill_(1.0)
    args["bk"].uniform_(-0.01, 0.01)
    hot = slice(M - 3000, M - 2990)  # ten tokens in the last slices with logit ~1,000, the rest ~0
    args["bk"][0, hot] = 125.0  # 64 * 125 / sqrt(64) = 1,000
    x = AttentionInputs(**args)
    out = decode_attention(x, 0.125, decode_config(x, num_splits=64))
    want = args["bv"][0, hot, 0].float().mean(0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, 0].float(), want, rtol=2e-2, atol=2e-2)


def _compiled_variants(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:  # older Triton: a plain dict per device
        return sum(len(c) for c in kernel.cache.values())
    return sum(len(entry[0]) for entry in caches.values())


@pytest.mark.parametrize("form", ["contextual", "fixed"])
def test_1000_consecutive_lengths_compile_a_few_variants(form: str) -> None:
    from flashtpa import triton_decode
    from flashtpa.dispatch import attention

    kernels = [triton_decode._decode_factor_kernel if form == "contextual" else triton_decode._decode_gqa_kernel,
               triton_decode._decode_merge_kernel]
    T_cap = 4096
    ranks = (6, 2, 2) if form == "contextual" else (0, 3, 3)
    args = _args(form, 1, 1, 34 if form == "contextual" else 9, 64, T_cap, [T_cap], ranks)
    args["kv_lens"] = torch.ones(1, dtype=torch.int32, device="cuda")
    attention(**args)
    before = sum(_compiled_variants(k) for k in kernels)
    assert before >= 2, "the kernel cache count does not see the compiled kernels"
    for length in range(1, 1001):
        args["kv_lens"].fill_(length)
        attention(**args)
    torch.cuda.synchronize()
    after = sum(_compiled_variants(k) for k in kernels)
    assert after - before <= 2, f"{after - before} new compilations over 1,000 lengths"


def test_cuda_graph_replay_follows_the_runtime_length() -> None:
    from flashtpa.dispatch import attention

    args = _args("fixed", 1, 1, 9, 64, 8192, [8192], (0, 3, 3))
    args["kv_lens"].fill_(100)
    static_out = attention(**args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = attention(**args)
    for length in (100, 5000, 8192):
        args["kv_lens"].fill_(length)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_out, oracle_attention(AttentionInputs(**args))) <= TOLERANCES[torch.bfloat16]
