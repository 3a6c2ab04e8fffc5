"""FlashTPA decode kernels: one new token per sequence, the cache split into slices across programs.

A split kernel (`_decode_factor_kernel` for contextual / KV-only K/V, `_decode_gqa_kernel` for fixed head factors)
walks one slice of one sequence's cache and writes a float32 partial output with its log2-sum-exp; the merge
(`_decode_merge_kernel`) combines the slices. Launch parameters are chosen in `flashtpa.triton_decode`; the design
is described in docs/kernels.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flashtpa.jit.common import dot as _dot
from flashtpa.jit.common import dot_probs, online_softmax, signal_dependents, token_rows, wait_for_primary


@triton.jit
def _slice_bounds(LENS, b, pid_s, T_cap, num_splits, min_chunk, ALIGN: tl.constexpr):
    """[start, end) of slice pid_s of sequence b, from the runtime length (empty for a slice it does not use).

    Slices start at multiples of ALIGN tokens: whole blocks for the factor kernel (16-token slices were slower at
    T6 shapes, benchmarks/NOTES.md), 16 for the GQA kernel.
    """
    seq_len = tl.minimum(tl.load(LENS + b).to(tl.int32), T_cap)
    # Slices in use for this length: at least min_chunk tokens each; the grid's surplus programs do nothing.
    n_used = tl.maximum(tl.minimum(num_splits, tl.cdiv(seq_len, min_chunk)), 1)
    chunk = tl.cdiv(tl.cdiv(seq_len, n_used), ALIGN) * ALIGN
    start = pid_s * chunk
    end = tl.minimum(start + chunk, seq_len)  # <= start for a slice past the length: no blocks
    return start, end


@triton.jit
def _store_partial(PART_O, PART_LSE, acc, m_i, l_i, b, head, h_mask, pid_s, offs_d,
                   stride_pob, stride_poh, stride_pos, stride_plb, stride_plh):
    """The slice's normalised output [H_PAD, D] and log2-sum-exp, float32; an empty slice (past the length, or
    a grid slot the length does not use) writes output 0 and -inf, so the merge never reads the length."""
    safe_l = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / safe_l[:, None]
    lse = tl.where(l_i > 0.0, m_i + tl.log2(safe_l), float("-inf"))
    tl.store(PART_O + b * stride_pob + head[:, None] * stride_poh + pid_s * stride_pos + offs_d[None, :], o,
             mask=h_mask[:, None])
    tl.store(PART_LSE + b * stride_plb + head * stride_plh + pid_s, lse, mask=h_mask)


@triton.jit
def _load_head_factor(A, base, offs_h, offs_t, h_mask, t_mask, stride_at, stride_ah):
    """Rank-1 head factors of a block, [HEAD_TILE, BLOCK_T] in the cache dtype (the tile `PREFETCH` loads ahead)."""
    t_off = offs_t.to(tl.int64) * stride_at
    return tl.load(A + base + t_off[None, :] + offs_h[:, None] * stride_ah, mask=h_mask[:, None] & t_mask[None, :],
                   other=0.0)


@triton.jit
def _head_factor_rank(A, tile, base, offs_h, offs_t, h_mask, t_mask, stride_at, stride_ah, r: tl.constexpr,
                      FROM_TILE: tl.constexpr, MASKED: tl.constexpr):
    """Rank r of a block's head factors, float32 [HEAD_TILE, BLOCK_T]: the prefetched rank-1 `tile`, or loaded here
    as a 2-D tile of its own (a strided load per rank, no rank reduction in registers)."""
    if FROM_TILE:
        out = tile.to(tl.float32)
    else:
        ptrs = A + base + offs_t.to(tl.int64)[None, :] * stride_at + offs_h[:, None] * stride_ah + r
        if MASKED:
            out = tl.load(ptrs, mask=h_mask[:, None] & t_mask[None, :], other=0.0).to(tl.float32)
        else:
            out = tl.load(ptrs, mask=h_mask[:, None], other=0.0).to(tl.float32)
    return out


@triton.jit
def _factor_block(
    q, qk_scale, acc, m_i, l_i, ak_tile, av_tile, AK, AV, BK, BV, bk_desc, bv_desc, ak_base, av_base, b,
    t0, offs_h, h_mask, offs_t, t_mask, offs_d,
    stride_akt, stride_akh, stride_bkb, stride_bkt, stride_bkr, stride_avt, stride_avh, stride_bvb, stride_bvt,
    stride_bvr,
    R_K: tl.constexpr, R_V: tl.constexpr, HEAD_TILE: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
    FROM_TILE: tl.constexpr, MASKED: tl.constexpr, SCALED_Q: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
):
    """One block of BLOCK_T tokens for the HEAD_TILE heads: online-softmax update of (acc, m_i, l_i).

    With SCALED_Q, q [HEAD_TILE, D] already carries qk_scale = scale * log2(e) / R_K, else the logits are
    scaled here; MASKED = False for blocks wholly inside the slice (no token masks on the loads or the logits).
    """
    # ---- logits [HEAD_TILE, BLOCK_T] = sum_r (q . bk_r) * ak_r
    logits = tl.zeros([HEAD_TILE, BLOCK_T], dtype=tl.float32)
    for r in tl.static_range(R_K):
        bk = token_rows(BK, bk_desc, b, t0, r, offs_t, t_mask, offs_d, stride_bkb, stride_bkt, stride_bkr,
                        TMA, MASKED, BLOCK_T, HEAD_DIM)  # [BLOCK_T, D]
        a_r = _head_factor_rank(AK, ak_tile, ak_base, offs_h, offs_t, h_mask, t_mask, stride_akt, stride_akh, r,
                                FROM_TILE, MASKED)
        logits += _dot(q, tl.trans(bk), IEEE) * a_r
    if not SCALED_Q:
        logits = logits * qk_scale
    if MASKED:
        logits = tl.where(t_mask[None, :], logits, float("-inf"))
    # ---- online softmax (base 2), one running max / sum per head
    p, alpha, m_new, l_i = online_softmax(logits, m_i, l_i)  # p [HEAD_TILE, BLOCK_T]
    acc = acc * alpha[:, None]
    # ---- values: acc += sum_r (p * av_r) . bv_r
    for r in tl.static_range(R_V):
        bv = token_rows(BV, bv_desc, b, t0, r, offs_t, t_mask, offs_d, stride_bvb, stride_bvt, stride_bvr,
                        TMA, MASKED, BLOCK_T, HEAD_DIM)  # [BLOCK_T, D]
        a_r = _head_factor_rank(AV, av_tile, av_base, offs_h, offs_t, h_mask, t_mask, stride_avt, stride_avh, r,
                                FROM_TILE, MASKED)
        acc += dot_probs(p * a_r, bv, IEEE)
    return acc, m_new, l_i


@triton.jit
def _decode_factor_kernel(
    Q, AQ, BQ, AK, BK, AV, BV, bk_desc, bv_desc, LENS, PART_O, PART_LSE,
    stride_qb, stride_qh,
    stride_aqb, stride_aqh, stride_bqb, stride_bqr,
    stride_akb, stride_akt, stride_akh,
    stride_bkb, stride_bkt, stride_bkr,
    stride_avb, stride_avt, stride_avh,
    stride_bvb, stride_bvt, stride_bvr,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    T_cap, H, num_splits, min_chunk, qk_scale,
    R_Q: tl.constexpr, RQ_PAD: tl.constexpr, R_K: tl.constexpr, R_V: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_TILE: tl.constexpr, BLOCK_T: tl.constexpr,
    Q_FACTORS: tl.constexpr, PREFETCH: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, TMA: tl.constexpr,
):
    """Contextual K/V: one program = one slice of one sequence for HEAD_TILE heads.

    With HEAD_TILE >= H every cache byte is read once; smaller head tiles re-read bk/bv once per tile (the
    programs of one slice are adjacent in the grid, so the re-reads mostly hit L2) and pad fewer heads.
    PREFETCH (rank 1): the head factors of the next block load one iteration ahead; else each rank loads as a 2-D
    tile of its own inside the block. PDL: the merge may start launching once this program has left its key loop.
    """
    pid_h = tl.program_id(0)
    b = tl.program_id(1)
    pid_s = tl.program_id(2)
    b64 = b.to(tl.int64)
    start, end = _slice_bounds(LENS, b, pid_s, T_cap, num_splits, min_chunk, BLOCK_T)

    offs_h = pid_h * HEAD_TILE + tl.arange(0, HEAD_TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t0 = tl.arange(0, BLOCK_T)
    h_mask = offs_h < H

    # ---- the query rows [HEAD_TILE, D]: q, or aq . bq / R_Q with the rank dim padded to 16 for tl.dot; the
    # latter is rounded from float32 anyway, so it takes the logit scale (and log2 e, 1/R_K) once, here; a full
    # query stays as given (rounding q * scale again costs accuracy) and its logits are scaled per block
    if Q_FACTORS:
        offs_r = tl.arange(0, RQ_PAD)
        aq = tl.load(AQ + b64 * stride_aqb + offs_h[:, None] * stride_aqh + offs_r[None, :],
                     mask=h_mask[:, None] & (offs_r[None, :] < R_Q), other=0.0)  # [HEAD_TILE, RQ_PAD]
        bq = tl.load(BQ + b64 * stride_bqb + offs_r[:, None] * stride_bqr + offs_d[None, :],
                     mask=offs_r[:, None] < R_Q, other=0.0)  # [RQ_PAD, D]
        q = _dot(aq.to(tl.float32), bq.to(tl.float32), IEEE) * (qk_scale / R_Q)
    else:
        q = tl.load(Q + b64 * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :],
                    mask=h_mask[:, None], other=0.0)  # [HEAD_TILE, D]
    q = q.to(BK.dtype.element_ty)

    m_i = tl.full([HEAD_TILE], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([HEAD_TILE], dtype=tl.float32)
    acc = tl.zeros([HEAD_TILE, HEAD_DIM], dtype=tl.float32)
    ak_base = b64 * stride_akb
    av_base = b64 * stride_avb
    # Blocks wholly inside [start, end) run without token masks; only the slice's last block can be partial.
    full_end = start + (tl.maximum(end - start, 0) // BLOCK_T) * BLOCK_T
    # Triton software-pipelines the bk/bv loads (they feed tl.dot through shared memory) but not the head
    # factors, which are used element-wise: PREFETCH loads the next block's ak/av one iteration ahead.
    offs_first = start + offs_t0
    if PREFETCH:
        ak_next = _load_head_factor(AK, ak_base, offs_h, offs_first, h_mask, offs_first < end, stride_akt, stride_akh)
        av_next = _load_head_factor(AV, av_base, offs_h, offs_first, h_mask, offs_first < end, stride_avt, stride_avh)
    else:  # placeholders, never read
        ak_next = tl.zeros([HEAD_TILE, BLOCK_T], dtype=tl.float32)
        av_next = tl.zeros([HEAD_TILE, BLOCK_T], dtype=tl.float32)
    for t0 in range(start, full_end, BLOCK_T):
        offs_t = t0 + offs_t0
        ak_cur = ak_next
        av_cur = av_next
        if PREFETCH:
            offs_n = offs_t + BLOCK_T
            ak_next = _load_head_factor(AK, ak_base, offs_h, offs_n, h_mask, offs_n < end, stride_akt, stride_akh)
            av_next = _load_head_factor(AV, av_base, offs_h, offs_n, h_mask, offs_n < end, stride_avt, stride_avh)
        acc, m_i, l_i = _factor_block(
            q, qk_scale, acc, m_i, l_i, ak_cur, av_cur, AK, AV, BK, BV, bk_desc, bv_desc, ak_base, av_base, b64,
            t0, offs_h, h_mask, offs_t, offs_t < end, offs_d,
            stride_akt, stride_akh, stride_bkb, stride_bkt, stride_bkr, stride_avt, stride_avh, stride_bvb,
            stride_bvt, stride_bvr,
            R_K, R_V, HEAD_TILE, BLOCK_T, HEAD_DIM, PREFETCH, False, Q_FACTORS, IEEE, TMA)
    if full_end < end:  # the partial last block, masked (head factors: the prefetched tile is already masked)
        offs_t = full_end + offs_t0
        t_mask = offs_t < end
        acc, m_i, l_i = _factor_block(
            q, qk_scale, acc, m_i, l_i, ak_next, av_next, AK, AV, BK, BV, bk_desc, bv_desc, ak_base, av_base, b64,
            full_end, offs_h, h_mask, offs_t, t_mask, offs_d,
            stride_akt, stride_akh, stride_bkb, stride_bkt, stride_bkr, stride_avt, stride_avh, stride_bvb,
            stride_bvt, stride_bvr,
            R_K, R_V, HEAD_TILE, BLOCK_T, HEAD_DIM, PREFETCH, True, Q_FACTORS, IEEE, TMA)

    signal_dependents(PDL)
    _store_partial(PART_O, PART_LSE, acc, m_i, l_i, b64, offs_h, h_mask, pid_s, offs_d,
                   stride_pob, stride_poh, stride_pos, stride_plb, stride_plh)


@triton.jit
def _gqa_block(q, qk_scale, acc, m_i, l_i, BK, BV, bk_desc, bv_desc, b, g, t0, offs_t, t_mask, offs_d,
               stride_bkb, stride_bkt, stride_bkr, stride_bvb, stride_bvt, stride_bvr,
               IEEE: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr, BLOCK_T: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """One block of BLOCK_T tokens of group g for its heads (the query rows): online-softmax update."""
    bk = token_rows(BK, bk_desc, b, t0, g, offs_t, t_mask, offs_d, stride_bkb, stride_bkt, stride_bkr,
                    TMA, MASKED, BLOCK_T, HEAD_DIM)  # [BLOCK_T, D]
    logits = _dot(q, tl.trans(bk), IEEE) * qk_scale  # [H_PAD, BLOCK_T]
    if MASKED:
        logits = tl.where(t_mask[None, :], logits, float("-inf"))
    p, alpha, m_new, l_i = online_softmax(logits, m_i, l_i)  # p [H_PAD, BLOCK_T]
    bv = token_rows(BV, bv_desc, b, t0, g, offs_t, t_mask, offs_d, stride_bvb, stride_bvt, stride_bvr,
                    TMA, MASKED, BLOCK_T, HEAD_DIM)  # [BLOCK_T, D]
    acc = acc * alpha[:, None] + dot_probs(p, bv, IEEE)
    return acc, m_new, l_i


@triton.jit
def _decode_gqa_kernel(
    Q, BK, BV, bk_desc, bv_desc, LENS, PART_O, PART_LSE,
    stride_qb, stride_qh,
    stride_bkb, stride_bkt, stride_bkr,
    stride_bvb, stride_bvt, stride_bvr,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    T_cap, heads_per_group, n_groups, num_splits, min_chunk, qk_scale,
    HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr,
    PDL: tl.constexpr, TMA: tl.constexpr,
):
    """Fixed head factors (GQA): one program = one slice of one (sequence, group); the group's heads are rows."""
    pid_bg = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bg // n_groups
    g = pid_bg % n_groups
    b64 = b.to(tl.int64)
    start, end = _slice_bounds(LENS, b, pid_s, T_cap, num_splits, min_chunk, 16)

    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t0 = tl.arange(0, BLOCK_T)
    h_mask = offs_h < heads_per_group
    head = g * heads_per_group + offs_h
    q = tl.load(Q + b64 * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None], other=0.0).to(BK.dtype.element_ty)  # [H_PAD, D]

    m_i = tl.full([H_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([H_PAD], dtype=tl.float32)
    acc = tl.zeros([H_PAD, HEAD_DIM], dtype=tl.float32)
    # Blocks wholly inside [start, end) run without token masks; only the slice's last block can be partial.
    full_end = start + (tl.maximum(end - start, 0) // BLOCK_T) * BLOCK_T
    for t0 in range(start, full_end, BLOCK_T):
        offs_t = t0 + offs_t0
        acc, m_i, l_i = _gqa_block(q, qk_scale, acc, m_i, l_i, BK, BV, bk_desc, bv_desc, b64, g, t0, offs_t,
                                   offs_t < end, offs_d, stride_bkb, stride_bkt, stride_bkr, stride_bvb, stride_bvt,
                                   stride_bvr, IEEE, TMA, False, BLOCK_T, HEAD_DIM)
    if full_end < end:
        offs_t = full_end + offs_t0
        acc, m_i, l_i = _gqa_block(q, qk_scale, acc, m_i, l_i, BK, BV, bk_desc, bv_desc, b64, g, full_end, offs_t,
                                   offs_t < end, offs_d, stride_bkb, stride_bkt, stride_bkr, stride_bvb, stride_bvt,
                                   stride_bvr, IEEE, TMA, True, BLOCK_T, HEAD_DIM)

    signal_dependents(PDL)
    _store_partial(PART_O, PART_LSE, acc, m_i, l_i, b64, head, h_mask, pid_s, offs_d,
                   stride_pob, stride_poh, stride_pos, stride_plb, stride_plh)


@triton.jit
def _decode_merge_kernel(
    PART_O, PART_LSE, OUT,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    stride_ob, stride_oh,
    num_splits, out_scale,
    S_PAD: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    """One program = BLOCK_D output columns of one (sequence, head): every slice's partial in one load.

    Every slice of the grid wrote a partial (an unused one: output 0, log-sum-exp -inf), so nothing here waits
    on the length: the log-sum-exps and outputs are two independent loads, one memory round trip. The weights
    are shifted by the MAXIMUM: each is <= 1, the largest exactly 1, so nothing under- or overflows. With PDL
    the programs launch while the split kernel finishes and wait here for its partials.
    """
    wait_for_primary(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, S_PAD)
    s_mask = offs_s < num_splits
    lse = tl.load(PART_LSE + b * stride_plb + h * stride_plh + offs_s, mask=s_mask, other=float("-inf"))
    o = tl.load(PART_O + b * stride_pob + h * stride_poh + offs_s[:, None] * stride_pos + offs_d[None, :],
                mask=s_mask[:, None], other=0.0)  # [S_PAD, BLOCK_D]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an empty sequence: every weight 0, output 0
    w = tl.exp2(lse - m)  # [S_PAD], 0 for unused slices
    den = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) * (out_scale / tl.where(den > 0.0, den, 1.0))
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty))
