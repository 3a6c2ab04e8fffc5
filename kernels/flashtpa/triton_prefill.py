"""FlashTPA prefill / extend launcher: N new tokens per sequence attend causally to a cached prefix and themselves.

`PrefillConfig` holds every launch parameter; `default_prefill_config` picks it for a call's shapes and device (the
production path, `flashtpa.triton_attention`, always takes the default); `prefill_attention` launches the kernels
of `flashtpa.jit.prefill`. Query n of sequence b sits at position kv_lens[b] - N + n; lengths are read on the
device, never compiled in (docs/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from flashtpa._launch import LOG2E, default_tma, fit_block_t, next_pow2, token_descriptors
from flashtpa.inputs import AttentionInputs
from flashtpa.jit.prefill import _prefill_kernel, _query_kernel

# From this many new tokens on, factored queries are built by `build_queries` before the attention kernel instead
# of in every (query tile, head) program; shorter prompts were not measured and skip the extra launch
# (benchmarks/NOTES.md, "Prefill query build").
PREBUILD_QUERIES_MIN_N = 256
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (the query tiles)


@dataclass(frozen=True)
class PrefillConfig:
    """The launch parameters of one prefill / extend call.

    block_n: queries per program (a tile of one head); block_t: keys per block of the key loop.
    num_warps, num_stages: Triton's launch options for the attention kernel.
    prebuild_queries: factored queries are built by `build_queries` before the kernel (contextual queries only).
    tma: the key blocks every row of a tile may read load bk / bv through TMA descriptors (Hopper and later).
    """

    block_n: int
    block_t: int
    num_warps: int
    num_stages: int
    prebuild_queries: bool
    tma: bool


def default_prefill_config(x: AttentionInputs) -> PrefillConfig:
    """The launch parameters for these inputs on their device (tuned on an H200: benchmarks/NOTES.md).

    The element-wise head factors of the contextual form make 64-query tiles with 128-key blocks the fastest (4
    warps, 3 stages); fixed head factors (plain MHA / GQA) take FlashAttention-like 128 x 64 tiles with 8 warps.
    """
    bk, bv = x.bk, x.bv
    R_K, D = bk.shape[2], bk.shape[3]
    fixed = x.ak is None
    N = x.q.shape[1] if x.q is not None else x.aq.shape[1]
    block_n, block_t, num_warps, num_stages = (128, 64, 8, 3) if fixed else (64, 128, 4, 3)
    return PrefillConfig(
        block_n=min(block_n, max(16, next_pow2(N))),
        block_t=fit_block_t(block_t, 2 if fixed else R_K + bv.shape[2], D, bk.element_size(), num_stages),
        num_warps=num_warps,
        num_stages=num_stages,
        prebuild_queries=x.q is None and N >= PREBUILD_QUERIES_MIN_N,
        # TMA pays for the factor forms, not for fixed head factors (benchmarks/NOTES.md, "TMA")
        tma=default_tma(bk, bv, pays=not fixed),
    )


def build_queries(aq: Tensor, bq: Tensor) -> Tensor:
    """q [B, N, H, D] = aq [B, N, H, R] . bq [B, N, R, D] per token (without the 1 / R), in bq's dtype: one
    program per token, each a [H, R] x [R, D] product (the rank and head dims padded to 16 for tl.dot)."""
    B, N, H, R = aq.shape
    D = bq.shape[-1]
    q = torch.empty(B, N, H, D, device=bq.device, dtype=bq.dtype)
    _query_kernel[(B * N,)](
        aq, bq, q,
        aq.stride(0), aq.stride(1), aq.stride(2), bq.stride(0), bq.stride(1), bq.stride(2),
        q.stride(0), q.stride(1), q.stride(2),
        N, H,
        R=R, R_PAD=max(16, next_pow2(R)), H_PAD=max(16, next_pow2(H)), HEAD_DIM=D, IEEE=bq.dtype == torch.float32,
        num_warps=4,
    )
    return q


def prefill_attention(x: AttentionInputs, scale: float, config: PrefillConfig | None = None) -> Tensor:
    """FlashTPA prefill / extend (inputs already validated by `flashtpa.triton_attention`).

    Args:
        x: the call's tensors (shapes in `AttentionInputs`); kv_lens counts the N new tokens and is read on the
            device.
        scale: the logit scale.
        config: launch parameters; default `default_prefill_config(x)`.

    Returns:
        [B, N, H, D] in the dtype of bk.

    Raises:
        ValueError: more query tiles than a launch holds, or a config that does not fit these inputs.
    """
    bk, bv, kv_lens = x.bk, x.bv, x.kv_lens
    q, aq, bq, ak, av = x.q, x.aq, x.bq, x.ak, x.av
    cfg = default_prefill_config(x) if config is None else config
    B, T_cap, R_K, D = bk.shape
    R_V = bv.shape[2]
    fixed = ak is None
    if cfg.prebuild_queries and q is None:
        q_scale = 1.0 / aq.shape[3]  # the 1 / R_Q the built queries leave to the logit scale
        q, aq, bq = build_queries(aq, bq), None, None  # [B, N, H, R_Q] . [B, N, R_Q, D] -> [B, N, H, D]
    else:
        q_scale = 1.0
    if q is not None:
        N, H = q.shape[1], q.shape[2]
        R_Q = 1
    else:
        N, H, R_Q = aq.shape[1], aq.shape[2], aq.shape[3]
    block_n = cfg.block_n
    if triton.cdiv(N, block_n) > _MAX_GRID_Y:
        raise ValueError(f"{N} new tokens make {triton.cdiv(N, block_n)} query tiles of {block_n}; a launch takes "
                         f"at most {_MAX_GRID_Y} (split the prompt, or raise block_n)")
    bk_desc, bv_desc = token_descriptors(bk, bv, cfg.block_t, cfg.tma)
    out = torch.empty(B, N, H, D, device=bk.device, dtype=bk.dtype)
    dummy = bk
    z3 = (0, 0, 0)
    q_str = (q.stride(0), q.stride(1), q.stride(2)) if q is not None else z3
    aq_str = (aq.stride(0), aq.stride(1), aq.stride(2)) if aq is not None else z3
    bq_str = (bq.stride(0), bq.stride(1), bq.stride(2)) if bq is not None else z3
    ak_str = (ak.stride(0), ak.stride(1), ak.stride(2)) if ak is not None else z3
    av_str = (av.stride(0), av.stride(1), av.stride(2)) if av is not None else z3
    ieee = bk.dtype == torch.float32
    qk_scale = scale * q_scale * LOG2E / (1 if fixed else R_K)
    # (sequence, head) varies fastest: the programs of one round share a query tile position, so they walk the
    # same key blocks together (all heads read the same bk / bv rows in the contextual form)
    grid = (B * H, triton.cdiv(N, block_n))
    _prefill_kernel[grid](
        q if q is not None else dummy, aq if aq is not None else dummy, bq if bq is not None else dummy,
        ak if ak is not None else dummy, bk, av if av is not None else dummy, bv, bk_desc, bv_desc, kv_lens, out,
        *q_str, *aq_str, *bq_str, *ak_str,
        bk.stride(0), bk.stride(1), bk.stride(2),
        *av_str,
        bv.stride(0), bv.stride(1), bv.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        N, H, H // R_K if fixed else H, T_cap, qk_scale, 1.0 if fixed else 1.0 / R_V,
        R_Q=R_Q, R_K=R_K, RK_PAD=next_pow2(R_K), R_V=R_V, RV_PAD=next_pow2(R_V), HEAD_DIM=D,
        BLOCK_N=block_n, BLOCK_T=cfg.block_t, Q_FACTORS=q is None, FIXED=fixed, IEEE=ieee, TMA=cfg.tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
