"""FlashTPA prefill / extend kernels: N new tokens per sequence attend causally to a cached prefix and themselves.

One program = one tile of BLOCK_N queries of one (sequence, head) walking the cache in BLOCK_T blocks with an
online softmax (the FlashAttention schedule); contextual K/V stay in factor space. `_query_kernel` builds
factored queries ahead of a long prompt. Launch parameters are chosen in `flashtpa.triton_prefill`; the design is
described in docs/kernels.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flashtpa.jit.common import dot as _dot
from flashtpa.jit.common import dot_probs, token_rows


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
    FIXED: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
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
        acc += dot_probs(p, bv, IEEE)
    else:
        for r in tl.static_range(R_V):
            bv = token_rows(BV, bv_desc, b, t0, r, offs_t, t_mask, offs_d, stride_bvb, stride_bvt, stride_bvr,
                             TMA, MASKED, BLOCK_T, HEAD_DIM)  # [BLOCK_T, D]
            acc += dot_probs(p * _rank(av, r, R_V, RV_PAD)[None, :], bv, IEEE)
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
    FIXED: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One loop step: the block at t0 with its head factors ak_next / av_next (loaded a step earlier), whose
    successors are loaded here. Returns the updated (acc, m_i, l_i, ak_next, av_next)."""
    ak, av = ak_next, av_next
    ak_next, av_next = _block_head_factors(AK, AV, ak_base, av_base, t0 + BLOCK_T, seq_len, offs_t0,
                                           stride_akt, stride_avt, R_K, RK_PAD, R_V, RV_PAD, FIXED, BLOCK_T)
    acc, m_i, l_i = _attend_block(
        q, acc, m_i, l_i, t0, pos, seq_len, ak, av, BK, BV, bk_desc, bv_desc, b, g, offs_t0, offs_d,
        stride_bkb, stride_bkt, stride_bkr, stride_bvb, stride_bvt, stride_bvr,
        qk_scale, R_K, RK_PAD, R_V, RV_PAD, FIXED, MASKED, IEEE, TMA, BLOCK_N, BLOCK_T, HEAD_DIM)
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
    Q_FACTORS: tl.constexpr, FIXED: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
):
    """One program = one tile of BLOCK_N queries of one (sequence, head), over every key it may see."""
    pid_bh = tl.program_id(0)
    # the query tiles with the most keys (the last queries) start first, so the cheap ones fill the last round
    pid_n = tl.num_programs(1) - 1 - tl.program_id(1)
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
    # alone: the next block's ak/av are loaded one iteration ahead, their latency hidden.
    ak_base = b * stride_akb + h * stride_akh
    av_base = b * stride_avb + h * stride_avh
    ak_next, av_next = _block_head_factors(AK, AV, ak_base, av_base, 0, seq_len, offs_t0, stride_akt, stride_avt,
                                           R_K, RK_PAD, R_V, RV_PAD, FIXED, BLOCK_T)
    # Two loops, not one with a branch: Triton software-pipelines the bk/bv loads of a loop body without
    # control flow. Blocks below full_end are visible to every row of the tile (no mask), the rest are diagonal.
    for t0 in range(0, full_end, BLOCK_T):
        acc, m_i, l_i, ak_next, av_next = _key_block(
            q, acc, m_i, l_i, ak_next, av_next, t0, pos, seq_len, AK, AV, BK, BV, bk_desc, bv_desc, ak_base, av_base,
            b, g, offs_t0, offs_d, stride_akt, stride_avt, stride_bkb, stride_bkt, stride_bkr, stride_bvb, stride_bvt,
            stride_bvr, qk_scale, R_K, RK_PAD, R_V, RV_PAD, FIXED, False, IEEE, TMA, BLOCK_N,
            BLOCK_T, HEAD_DIM)
    for t0 in range(full_end, hi, BLOCK_T):
        acc, m_i, l_i, ak_next, av_next = _key_block(
            q, acc, m_i, l_i, ak_next, av_next, t0, pos, seq_len, AK, AV, BK, BV, bk_desc, bv_desc, ak_base, av_base,
            b, g, offs_t0, offs_d, stride_akt, stride_avt, stride_bkb, stride_bkt, stride_bkr, stride_bvb, stride_bvt,
            stride_bvr, qk_scale, R_K, RK_PAD, R_V, RV_PAD, FIXED, True, IEEE, TMA, BLOCK_N,
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
