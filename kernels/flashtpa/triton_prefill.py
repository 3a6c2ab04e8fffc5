"""FlashTPA prefill / extend in Triton: N new tokens per sequence attend causally to a cached prefix and themselves.

One program = one tile of BLOCK_N queries of one (sequence, head); it walks the cache in BLOCK_T blocks with an
online softmax (the FlashAttention schedule). The grid runs (sequence, head) fastest and the query tiles from the
last (the most keys) to the first, so that the cheap tiles fill the last round of programs. Query n of sequence b
sits at position kv_lens[b] - N + n, so the tile's keys split into blocks every row may read (no mask) and the
diagonal blocks (masked); lengths are read on the device, never compiled in.

Contextual K/V stay in factor space, as in decode: scores = sum_r (q . bk_r) * ak_r and the output
sum_r (p * av_r) . bv_r, one tl.dot per rank. Nothing is rebuilt or rounded to the cache dtype on the way (a
materialised bf16 K tile costs an extra rounding: 3.4e-3 relative error measured on an H200 for a KV-only
prefill, over the 3e-3 target), and the rank-1 paper shape costs exactly one dot per side, like MHA. Fixed head
factors read bk/bv of the head's group directly: ordinary GQA. The cache is read in place by its strides; on
Hopper the contextual / KV-only forms load the blocks every row may read through TMA descriptors over the same
views (`_jit_common.token_rows`). Prompts of PREBUILD_QUERIES_MIN_N tokens or more get their factored queries built
by a small kernel of their own before the attention kernel (`build_queries`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from flashtpa._jit_common import LOG2E, dot as _dot, dot_probs, token_descriptors, token_rows
from flashtpa._launch import fit_block_t, next_pow2 as _next_pow2


@triton.jit
def _head_factors(A, base, offs_t, t_mask, stride_at, R: tl.constexpr, R_PAD: tl.constexpr):
    """One head's factors for a block of tokens, float32: [BLOCK_T] for R = 1, else [BLOCK_T, R_PAD]."""
    t_off = offs_t.to(tl.int64) * stride_at  # a long cache's T offset times its stride passes 2^31
    if R == 1:
        tile = tl.load(A + base + t_off, mask=t_mask, other=0.0).to(tl.float32)
    else:
        offs_r = tl.arange(0, R_PAD)
        tile = tl.load(A + base + t_off[:, None] + offs_r[None, :], mask=t_mask[:, None] & (offs_r < R)[None, :],
                       other=0.0).to(tl.float32)
    return tile


@triton.jit
def _rank(tile, r: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr):
    """Rank r of a `_head_factors` tile: [BLOCK_T] float32."""
    if R == 1:
        out = tile
    else:
        out = tl.sum(tl.where((tl.arange(0, R_PAD) == r)[None, :], tile, 0.0), 1)
    return out


@triton.jit
def _attend_block(
    q, acc, m_i, l_i, t0, pos, seq_len, ak, av,
    BK, BV, bk_desc, bv_desc, b, g, offs_t0, offs_d,
    stride_bkb, stride_bkt, stride_bkr, stride_bvb, stride_bvt, stride_bvr,
    qk_scale,
    R_K: tl.constexpr, RK_PAD: tl.constexpr, R_V: tl.constexpr, RV_PAD: tl.constexpr,
    FIXED: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, SPLIT_P: tl.constexpr, TMA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One BLOCK_T block of keys for a [BLOCK_N, D] query tile of one head: update (acc, m_i, l_i).

    ak, av: the block's head factors of this head (`_head_factors`, loaded by the caller, a block ahead).
    """
    offs_t = t0 + offs_t0
    t_mask = offs_t < seq_len
    # ---- scores [BLOCK_N, BLOCK_T]
    if FIXED:
        bk = token_rows(BK, bk_desc, b, t0, g, offs_t, t_mask, offs_d, stride_bkb, stride_bkt, stride_bkr,
                         TMA, MASKED, BLOCK_T, HEAD_DIM)  # [BLOCK_T, D]
        s = _dot(q, tl.trans(bk), IEEE) * qk_scale
    else:
        # the logit scale rides on the [BLOCK_T] head factors: one multiply per score element, as for MHA
        for r in tl.static_range(R_K):
            bk = token_rows(BK, bk_desc, b, t0, r, offs_t, t_mask, offs_d, stride_bkb, stride_bkt, stride_bkr,
                             TMA, MASKED, BLOCK_T, HEAD_DIM)  # [BLOCK_T, D]
            term = _dot(q, tl.trans(bk), IEEE) * (_rank(ak, r, R_K, RK_PAD) * qk_scale)[None, :]
            if r == 0:
                s = term
            else:
                s += term
    if MASKED:
        allowed = (offs_t[None, :] <= pos[:, None]) & t_mask[None, :]
        s = tl.where(allowed, s, float("-inf"))
    # ---- online softmax (base 2)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that sees no key at all (only possible for lengths below N, a contract violation) stays finite.
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # [BLOCK_N, BLOCK_T]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    # ---- values: acc += sum_r (p * av_r) . bv_r
    if FIXED:
        bv = token_rows(BV, bv_desc, b, t0, g, offs_t, t_mask, offs_d, stride_bvb, stride_bvt, stride_bvr,
                         TMA, MASKED, BLOCK_T, HEAD_DIM)  # [BLOCK_T, D]
        acc += dot_probs(p, bv, IEEE, SPLIT_P)
    else:
        for r in tl.static_range(R_V):
            bv = token_rows(BV, bv_desc, b, t0, r, offs_t, t_mask, offs_d, stride_bvb, stride_bvt, stride_bvr,
                             TMA, MASKED, BLOCK_T, HEAD_DIM)  # [BLOCK_T, D]
            acc += dot_probs(p * _rank(av, r, R_V, RV_PAD)[None, :], bv, IEEE, SPLIT_P)
    return acc, m_new, l_i


@triton.jit
def _block_head_factors(AK, AV, ak_base, av_base, t0, seq_len, offs_t0, stride_akt, stride_avt,
                        R_K: tl.constexpr, RK_PAD: tl.constexpr, R_V: tl.constexpr, RV_PAD: tl.constexpr,
                        FIXED: tl.constexpr, BLOCK_T: tl.constexpr):
    """(ak, av) of the block at t0 (zeros, never read, for fixed head factors)."""
    offs_t = t0 + offs_t0
    if FIXED:
        ak = tl.zeros([BLOCK_T], dtype=tl.float32)
        av = tl.zeros([BLOCK_T], dtype=tl.float32)
    else:
        ak = _head_factors(AK, ak_base, offs_t, offs_t < seq_len, stride_akt, R_K, RK_PAD)
        av = _head_factors(AV, av_base, offs_t, offs_t < seq_len, stride_avt, R_V, RV_PAD)
    return ak, av


@triton.jit
def _key_block(
    q, acc, m_i, l_i, ak_next, av_next, t0, pos, seq_len, AK, AV, BK, BV, bk_desc, bv_desc, ak_base, av_base, b, g,
    offs_t0, offs_d, stride_akt, stride_avt, stride_bkb, stride_bkt, stride_bkr, stride_bvb, stride_bvt, stride_bvr,
    qk_scale,
    R_K: tl.constexpr, RK_PAD: tl.constexpr, R_V: tl.constexpr, RV_PAD: tl.constexpr,
    FIXED: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, PREFETCH: tl.constexpr,
    SPLIT_P: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One loop step: the block at t0 with its head factors (prefetched: ak_next / av_next, whose successors are
    loaded here; else loaded now). Returns the updated (acc, m_i, l_i, ak_next, av_next)."""
    if PREFETCH:
        ak, av = ak_next, av_next
        ak_next, av_next = _block_head_factors(AK, AV, ak_base, av_base, t0 + BLOCK_T, seq_len, offs_t0,
                                               stride_akt, stride_avt, R_K, RK_PAD, R_V, RV_PAD, FIXED, BLOCK_T)
    else:
        ak, av = _block_head_factors(AK, AV, ak_base, av_base, t0, seq_len, offs_t0, stride_akt, stride_avt,
                                     R_K, RK_PAD, R_V, RV_PAD, FIXED, BLOCK_T)
    acc, m_i, l_i = _attend_block(
        q, acc, m_i, l_i, t0, pos, seq_len, ak, av, BK, BV, bk_desc, bv_desc, b, g, offs_t0, offs_d,
        stride_bkb, stride_bkt, stride_bkr, stride_bvb, stride_bvt, stride_bvr,
        qk_scale, R_K, RK_PAD, R_V, RV_PAD, FIXED, MASKED, IEEE, SPLIT_P, TMA, BLOCK_N, BLOCK_T, HEAD_DIM)
    return acc, m_i, l_i, ak_next, av_next


@triton.jit
def _prefill_kernel(
    Q, AQ, BQ, AK, BK, AV, BV, bk_desc, bv_desc, LENS, OUT,
    stride_qb, stride_qn, stride_qh,
    stride_aqb, stride_aqn, stride_aqh, stride_bqb, stride_bqn, stride_bqr,
    stride_akb, stride_akt, stride_akh,
    stride_bkb, stride_bkt, stride_bkr,
    stride_avb, stride_avt, stride_avh,
    stride_bvb, stride_bvt, stride_bvr,
    stride_ob, stride_on, stride_oh,
    N, H, heads_per_group, T_cap, qk_scale, out_scale,
    R_Q: tl.constexpr, R_K: tl.constexpr, RK_PAD: tl.constexpr, R_V: tl.constexpr, RV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    Q_FACTORS: tl.constexpr, FIXED: tl.constexpr, IEEE: tl.constexpr, PREFETCH: tl.constexpr,
    SPLIT_P: tl.constexpr, TMA: tl.constexpr, HEAVY_FIRST: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    if HEAVY_FIRST:  # the grid starts the query tiles with the most keys (the last queries) first
        pid_n = tl.num_programs(1) - 1 - pid_n
    b = (pid_bh // H).to(tl.int64)  # batch offsets of a large cache pass 2^31
    h = pid_bh % H
    g = h // heads_per_group
    seq_len = tl.minimum(tl.load(LENS + b).to(tl.int32), T_cap)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t0 = tl.arange(0, BLOCK_T)
    n_mask = offs_n < N
    pos = seq_len - N + offs_n  # cache position of each query row

    # ---- the query tile [BLOCK_N, D]
    if Q_FACTORS:
        qf = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for r in tl.static_range(R_Q):
            a = tl.load(AQ + b * stride_aqb + offs_n * stride_aqn + h * stride_aqh + r, mask=n_mask, other=0.0)
            bq = tl.load(BQ + b * stride_bqb + offs_n[:, None] * stride_bqn + r * stride_bqr + offs_d[None, :],
                         mask=n_mask[:, None], other=0.0)
            qf += a.to(tl.float32)[:, None] * bq.to(tl.float32)
        q = (qf * (1.0 / R_Q)).to(BK.dtype.element_ty)
    else:
        q = tl.load(Q + b * stride_qb + offs_n[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                    mask=n_mask[:, None], other=0.0).to(BK.dtype.element_ty)

    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    first_pos = seq_len - N + pid_n * BLOCK_N  # the tile's smallest position
    full_end = tl.maximum(first_pos + 1, 0) // BLOCK_T * BLOCK_T  # blocks below this are visible to every row
    hi = tl.minimum(first_pos + BLOCK_N, seq_len)  # one past the tile's largest readable position
    # Head factors are used element-wise, so Triton's pipeliner (which stages loads feeding tl.dot) leaves them
    # alone: with PREFETCH the next block's ak/av are loaded one iteration ahead, their latency hidden.
    ak_base = b * stride_akb + h * stride_akh
    av_base = b * stride_avb + h * stride_avh
    # the first block's factors (without PREFETCH each step loads its own: placeholders, nothing loaded here)
    ak_next, av_next = _block_head_factors(AK, AV, ak_base, av_base, 0, seq_len, offs_t0, stride_akt, stride_avt,
                                           R_K, RK_PAD, R_V, RV_PAD, FIXED or not PREFETCH, BLOCK_T)
    # Two loops, not one with a branch: Triton software-pipelines the bk/bv loads of a loop body without
    # control flow. Blocks below full_end are visible to every row of the tile (no mask), the rest are diagonal.
    for t0 in range(0, full_end, BLOCK_T):
        acc, m_i, l_i, ak_next, av_next = _key_block(
            q, acc, m_i, l_i, ak_next, av_next, t0, pos, seq_len, AK, AV, BK, BV, bk_desc, bv_desc, ak_base, av_base,
            b, g, offs_t0, offs_d, stride_akt, stride_avt, stride_bkb, stride_bkt, stride_bkr, stride_bvb, stride_bvt,
            stride_bvr, qk_scale, R_K, RK_PAD, R_V, RV_PAD, FIXED, False, IEEE, PREFETCH, SPLIT_P, TMA, BLOCK_N,
            BLOCK_T, HEAD_DIM)
    for t0 in range(full_end, hi, BLOCK_T):
        acc, m_i, l_i, ak_next, av_next = _key_block(
            q, acc, m_i, l_i, ak_next, av_next, t0, pos, seq_len, AK, AV, BK, BV, bk_desc, bv_desc, ak_base, av_base,
            b, g, offs_t0, offs_d, stride_akt, stride_avt, stride_bkb, stride_bkt, stride_bkr, stride_bvb, stride_bvt,
            stride_bvr, qk_scale, R_K, RK_PAD, R_V, RV_PAD, FIXED, True, IEEE, PREFETCH, SPLIT_P, TMA, BLOCK_N,
            BLOCK_T, HEAD_DIM)

    safe_l = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc * (out_scale / safe_l)[:, None]
    tl.store(OUT + b * stride_ob + offs_n[:, None] * stride_on + h * stride_oh + offs_d[None, :],
             o.to(OUT.dtype.element_ty), mask=n_mask[:, None])


@triton.jit
def _query_kernel(
    AQ, BQ, Q,
    stride_aqb, stride_aqn, stride_aqh, stride_bqb, stride_bqn, stride_bqr, stride_qb, stride_qn, stride_qh,
    N, H,
    R: tl.constexpr, R_PAD: tl.constexpr, H_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
):
    """One token's queries from their factors: q [H, D] = aq [H, R] . bq [R, D] (no 1 / R: the caller's logit
    scale carries it), float32 accumulation, stored in q's dtype."""
    pid = tl.program_id(0)
    b = (pid // N).to(tl.int64)
    n = pid % N
    offs_h = tl.arange(0, H_PAD)
    offs_r = tl.arange(0, R_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    h_mask = offs_h < H
    r_mask = offs_r < R
    aq = tl.load(AQ + b * stride_aqb + n * stride_aqn + offs_h[:, None] * stride_aqh + offs_r[None, :],
                 mask=h_mask[:, None] & r_mask[None, :], other=0.0)  # [H_PAD, R_PAD]
    bq = tl.load(BQ + b * stride_bqb + n * stride_bqn + offs_r[:, None] * stride_bqr + offs_d[None, :],
                 mask=r_mask[:, None], other=0.0)  # [R_PAD, D]
    q = _dot(aq, bq, IEEE)  # [H_PAD, D]
    tl.store(Q + b * stride_qb + n * stride_qn + offs_h[:, None] * stride_qh + offs_d[None, :],
             q.to(Q.dtype.element_ty), mask=h_mask[:, None])


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
        R=R, R_PAD=max(16, _next_pow2(R)), H_PAD=max(16, _next_pow2(H)), HEAD_DIM=D, IEEE=bq.dtype == torch.float32,
        num_warps=4,
    )
    return q


# From this many new tokens on, factored queries are built by `build_queries` before the attention kernel. In the
# kernel every (query tile, head) program rebuilds its tile from all R_Q ranks: at R_Q = 16 about 1,800 of the
# 3,900 instructions a warp runs outside the unmasked key loop (ncu, N = M = 4,096, H200, 2026-11-28 23:58 UTC).
# Prebuilt was faster at every size and rank measured, paper shape (R_Q = 16) and T6 (R_Q = 6), H200, 2026-11-29
# 01:27 UTC, 3 rounds, prebuilt vs in-kernel: N = M = 2,048 79.1 vs 90.0 us, 8,192 867.3 vs 942.2, N = 1,024
# after 1,024 58.0 vs 61.2, N = 256 after 3,840 49.5 vs 50.5, N = M = 512 18.5 vs 19.2; T6 H = 34 N = M = 2,048
# 136.1 vs 141.7, N = 512 after 3,584 178.6 vs 184.0. Shorter prompts were not measured and keep the in-kernel
# build (no extra launch). (The batched torch.matmul this kernel replaced took 13.4 us at N = 2,048 vs 10.4 and
# 111 vs 62 at 32,768, and lost at short prompts.)
PREBUILD_QUERIES_MIN_N = 256
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (the query tiles)


def prefill_attention(
    *,
    q: Tensor | None,
    aq: Tensor | None,
    bq: Tensor | None,
    ak: Tensor | None,
    bk: Tensor,
    av: Tensor | None,
    bv: Tensor,
    kv_lens: Tensor,
    scale: float,
    block_n: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    prefetch: bool = True,
    split_p: bool = False,
    prebuild_queries: bool | None = None,
    tma: bool | None = None,
    heavy_first: bool = True,
) -> Tensor:
    """FlashTPA prefill/extend launcher (inputs already validated by `flashtpa.triton_attention`).

    Args:
        q: [B, N, H, D] full queries, or aq [B, N, H, R_Q] with bq [B, N, R_Q, D].
        ak, av: [B, T_cap, H, R_K], [B, T_cap, H, R_V], or both None (fixed head factors, G = R_K groups).
        bk, bv: [B, T_cap, R_K, D], [B, T_cap, R_V, D] cache views, last dim contiguous.
        kv_lens: [B] int32 valid tokens per sequence, the N new ones included (read on the device).
        block_n, block_t, num_warps, num_stages: tuning knobs; the defaults suit an H200.
        prefetch: load the contextual head factors one key block ahead (hides their latency).
        split_p: 16-bit inputs: each probability tile enters the value product as two cache-dtype terms (hi + lo),
            so it keeps ~16 mantissa bits instead of 8 (one more tensor-core product per block)
        prebuild_queries: factored queries: build q = aq . bq with `build_queries` before the kernel instead
            of in every (query tile, head) program; default: from PREBUILD_QUERIES_MIN_N new tokens on.
        tma: load the token factors of unmasked key blocks through TMA descriptors (`flashtpa._jit_common.token_rows`;
            forcing as in `flashtpa._jit_common.token_descriptors`); default: contextual / KV-only, where it paid
            (paper shape N = M = 8,192: 929.2 vs 966.6 us; N = 256 after 3,840: 46.7 vs 53.8), not fixed head
            factors (MHA-as-TPA N = M = 8,192: 767.2 vs 746.9; H200, 2026-11-29 00:27 UTC).
        heavy_first: launch the query tiles in decreasing order of their key count (the causal diagonal makes the
            last tile of a prompt read N / BLOCK_N times the keys of its first), so that the short tiles fill the
            last round of programs instead of the long ones (paper shape N = M = 2,048: 81.0 vs 94.5 us with the
            earlier tile-major ascending grid; 4,096: 251.0 vs 278.6; MHA-as-TPA N = M = 2,048: 56.2 vs 74.1;
            H200, 2026-11-29 00:55 UTC).

    Returns:
        [B, N, H, D] in the dtype of bk.
    """
    B, T_cap, R_K, D = bk.shape
    R_V = bv.shape[2]
    fixed = ak is None
    q_scale = 1.0  # what the logits owe the query: 1 / R_Q for queries built from factors outside the kernel
    if prebuild_queries is None:
        prebuild_queries = q is None and aq.shape[1] >= PREBUILD_QUERIES_MIN_N
    if q is None and prebuild_queries:
        q_scale = 1.0 / aq.shape[3]
        q, aq, bq = build_queries(aq, bq), None, None  # [B, N, H, R_Q] . [B, N, R_Q, D] -> [B, N, H, D]
    if q is not None:
        N, H = q.shape[1], q.shape[2]
        R_Q = 1
    else:
        N, H, R_Q = aq.shape[1], aq.shape[2], aq.shape[3]
    # Defaults from the H200 sweeps (benchmarks/RESULTS.md): the element-wise head factors of the contextual
    # form make smaller query tiles with longer key blocks the fastest (64 x 128, 4 warps, 3 stages: 1.8-3.7%
    # ahead of 2 stages at N = 2,048-8,192); fixed head factors (plain MHA/GQA) take the FlashAttention-like
    # 128 x 64 tiles with 8 warps and 3 stages.
    if fixed:
        cfg = (128, 64, 8, 3)
    else:
        cfg = (64, 128, 4, 3)
    block_n = min(cfg[0], max(16, _next_pow2(N))) if block_n is None else block_n
    if triton.cdiv(N, block_n) > _MAX_GRID_Y:
        raise ValueError(f"{N} new tokens make {triton.cdiv(N, block_n)} query tiles of {block_n}; a launch takes "
                         f"at most {_MAX_GRID_Y} (split the prompt, or raise block_n)")
    block_t = cfg[1] if block_t is None else block_t
    num_warps = cfg[2] if num_warps is None else num_warps
    num_stages = cfg[3] if num_stages is None else num_stages
    block_t = fit_block_t(block_t, 2 if fixed else R_K + R_V, D, bk.element_size(), num_stages)
    tma, bk_desc, bv_desc = token_descriptors(bk, bv, block_t, tma, pays=not fixed)
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
        R_Q=R_Q, R_K=R_K, RK_PAD=_next_pow2(R_K), R_V=R_V, RV_PAD=_next_pow2(R_V), HEAD_DIM=D,
        BLOCK_N=block_n, BLOCK_T=block_t, Q_FACTORS=q is None, FIXED=fixed, IEEE=ieee, PREFETCH=prefetch,
        SPLIT_P=split_p and not ieee, TMA=tma, HEAVY_FIRST=heavy_first,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
