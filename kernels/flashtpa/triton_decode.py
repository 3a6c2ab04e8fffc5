"""FlashTPA decode in Triton: one new token per sequence, the cache split across programs (flash-decoding).

Stages: a split kernel (`_decode_factor_kernel` for contextual / KV-only K/V, `_decode_gqa_kernel` for fixed head
factors) walks one slice of one sequence's cache and writes a float32 partial output with its log2-sum-exp
(every slice of the grid writes one, an empty slice 0 and -inf); `_decode_merge_kernel` combines them in one
load per (sequence, head, column tile), shifting by the MAXIMUM log-sum-exp so that no slice overflows (the
official kernel shifts by the minimum and returns NaN once slices differ by ~88).

Why it is shaped this way (../shared/design/tpa-reference.md, performance.md):
- Sequence lengths are read from `kv_lens` inside the kernels: nothing about a length is a constexpr or a
  launch-shape input, so a decode loop never recompiles and a CUDA graph replays across steps. The number of
  slices in the grid follows the buffer capacity; the slices a sequence actually uses follow its runtime length.
- Contextual K/V: one program holds a tile of heads (all H up to 64, else tiles of 32, so H = 78 pads to 96,
  not 128); with one tile every cache byte (ak, bk, av, bv of a token) is read once, with several the tiles of
  a slice are adjacent in the grid and re-read bk/bv mostly from L2. The ranks R_K, R_V are unrolled and each
  rank is one tl.dot of [heads, D] x [D, T_blk]. The query is rebuilt from aq, bq in the program with the rank
  dim padded to 16 for tl.dot (any R_Q works, R_Q = 6 included) and takes the logit scale once. Head factors
  are used element-wise, so Triton does not software-pipeline them as it does bk/bv: rank-1 factors are
  prefetched one block ahead; higher ranks are loaded per rank as 2-D tiles (one [heads, T_blk, R] tile split
  in registers spilled at T6 ranks: 512 B of stack in an sm_90 build). Blocks wholly inside a slice run
  without token masks.
- Grid: about two programs per SM (the rank-1 kernel takes ~234 registers a thread, so two fit), rounded down
  so that no nearly empty extra round of programs starts, and down to a power of two of slices where that costs
  at most 1/32 of them (the merge then pads nothing); slices of at least 64 tokens, so that short caches
  still spread over many programs. The factor kernel's slices are whole blocks (16-token slices were 20-30%
  slower at T6 shapes on the H200); the GQA kernel's are 16-token multiples.
- Fixed head factors (GQA): one program per (sequence, group), the group's heads stacked as query rows (padded
  to 16 for tl.dot), reading the ordinary [B, T, G, D] cache.
- Every tensor is addressed by its strides (last dim contiguous): the FactorCache views are read in place;
  batch and token offsets are 64-bit (a 16 x 2^18-token GQA cache passes 2^31 elements). On Hopper the rank-1
  and GQA kernels load whole blocks of bk / bv through TMA descriptors over the same views
  (`_jit_common.token_rows`); a slice's partial last block loads through masked pointers.
- After the contextual / KV-only kernel the merge is a programmatic dependent launch (PDL): it is launched while
  the split programs finish and waits for their partials on the device.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from flashtpa._jit_common import (LOG2E, dot as _dot, dot_probs, online_softmax, pdl_supported, signal_dependents,
                                 token_descriptors, token_rows, wait_for_primary)
from flashtpa._launch import fit_block_t, next_pow2 as _next_pow2


@triton.jit
def _slice_bounds(LENS, b, pid_s, T_cap, num_splits, min_chunk, ALIGN: tl.constexpr):
    """[start, end) of slice pid_s of sequence b, from the runtime length (empty for a slice it does not use).

    Slices start at multiples of ALIGN tokens: whole blocks for the factor kernel (16-token slices measured 25%
    slower at T6 shapes on the H200, 21:50 UTC run), 16 for the GQA kernel.
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
def _load_head_factor(A, base, offs_h, offs_t, h_mask, t_mask, stride_at, stride_ah,
                      R: tl.constexpr, R_PAD: tl.constexpr):
    """Head factors of a block, all ranks at once: [HEAD_TILE, BLOCK_T] for R = 1, else [HEAD_TILE, BLOCK_T, R_PAD]."""
    t_off = offs_t.to(tl.int64) * stride_at
    if R == 1:
        tile = tl.load(A + base + t_off[None, :] + offs_h[:, None] * stride_ah,
                       mask=h_mask[:, None] & t_mask[None, :], other=0.0)
    else:
        offs_r = tl.arange(0, R_PAD)
        tile = tl.load(A + base + t_off[None, :, None] + offs_h[:, None, None] * stride_ah + offs_r[None, None, :],
                       mask=h_mask[:, None, None] & t_mask[None, :, None] & (offs_r < R)[None, None, :], other=0.0)
    return tile


@triton.jit
def _rank(tile, r: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr):
    """Rank r of a `_load_head_factor` tile as float32 [HEAD_TILE, BLOCK_T] (the rank dim is within a thread)."""
    if R == 1:
        out = tile.to(tl.float32)
    else:
        offs_r = tl.arange(0, R_PAD)
        out = tl.sum(tl.where((offs_r == r)[None, None, :], tile.to(tl.float32), 0.0), 2)
    return out


@triton.jit
def _head_factor_rank(A, tile, base, offs_h, offs_t, h_mask, t_mask, stride_at, stride_ah, r: tl.constexpr,
                      R: tl.constexpr, R_PAD: tl.constexpr, FROM_TILE: tl.constexpr, MASKED: tl.constexpr):
    """Rank r of a block's head factors, float32 [HEAD_TILE, BLOCK_T]: taken from `tile` (all ranks, loaded
    earlier) or loaded here as a 2-D tile of its own (a strided load per rank, no rank reduction in registers)."""
    if FROM_TILE:
        out = _rank(tile, r, R, R_PAD)
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
    R_K: tl.constexpr, RK_PAD: tl.constexpr, R_V: tl.constexpr, RV_PAD: tl.constexpr,
    HEAD_TILE: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, FROM_TILE: tl.constexpr,
    MASKED: tl.constexpr, SCALED_Q: tl.constexpr, IEEE: tl.constexpr, SPLIT_P: tl.constexpr, TMA: tl.constexpr,
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
                                R_K, RK_PAD, FROM_TILE, MASKED)
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
                                R_V, RV_PAD, FROM_TILE, MASKED)
        acc += dot_probs(p * a_r, bv, IEEE, SPLIT_P)
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
    R_Q: tl.constexpr, RQ_PAD: tl.constexpr, R_K: tl.constexpr, RK_PAD: tl.constexpr,
    R_V: tl.constexpr, RV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_TILE: tl.constexpr, BLOCK_T: tl.constexpr,
    Q_FACTORS: tl.constexpr, HF_MODE: tl.constexpr, IEEE: tl.constexpr, SPLIT_P: tl.constexpr,
    PDL_SIGNAL: tl.constexpr, TMA: tl.constexpr,
):
    """Contextual K/V: one program = one slice of one sequence for HEAD_TILE heads.

    With HEAD_TILE >= H every cache byte is read once; smaller head tiles re-read bk/bv once per tile (the
    programs of one slice are adjacent in the grid, so the re-reads mostly hit L2) and pad fewer heads.
    HF_MODE: 0 = head factors loaded per rank as 2-D tiles in the block, 1 = all ranks prefetched one block
    ahead, 2 = all ranks loaded in the block. PDL_SIGNAL: when the merge may start launching (0: at the end, as
    usual; 1: once every program has left its key loop; 2: at once, its programs then wait for this grid).
    """
    signal_dependents(PDL_SIGNAL == 2)
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
    # factors, which are used element-wise: HF_MODE 1 loads the next block's ak/av one iteration ahead.
    offs_first = start + offs_t0
    ak_next = _load_head_factor(AK, ak_base, offs_h, offs_first, h_mask, offs_first < end, stride_akt, stride_akh,
                                R_K, RK_PAD)
    av_next = _load_head_factor(AV, av_base, offs_h, offs_first, h_mask, offs_first < end, stride_avt, stride_avh,
                                R_V, RV_PAD)
    for t0 in range(start, full_end, BLOCK_T):
        offs_t = t0 + offs_t0
        if HF_MODE == 1:
            ak_cur = ak_next
            av_cur = av_next
            offs_n = offs_t + BLOCK_T
            ak_next = _load_head_factor(AK, ak_base, offs_h, offs_n, h_mask, offs_n < end, stride_akt, stride_akh,
                                        R_K, RK_PAD)
            av_next = _load_head_factor(AV, av_base, offs_h, offs_n, h_mask, offs_n < end, stride_avt, stride_avh,
                                        R_V, RV_PAD)
        elif HF_MODE == 2:
            ak_cur = _load_head_factor(AK, ak_base, offs_h, offs_t, h_mask, offs_t < end, stride_akt, stride_akh,
                                       R_K, RK_PAD)
            av_cur = _load_head_factor(AV, av_base, offs_h, offs_t, h_mask, offs_t < end, stride_avt, stride_avh,
                                       R_V, RV_PAD)
        else:
            ak_cur = ak_next
            av_cur = av_next
        acc, m_i, l_i = _factor_block(
            q, qk_scale, acc, m_i, l_i, ak_cur, av_cur, AK, AV, BK, BV, bk_desc, bv_desc, ak_base, av_base, b64,
            t0, offs_h, h_mask, offs_t, offs_t < end, offs_d,
            stride_akt, stride_akh, stride_bkb, stride_bkt, stride_bkr, stride_avt, stride_avh, stride_bvb,
            stride_bvt, stride_bvr,
            R_K, RK_PAD, R_V, RV_PAD, HEAD_TILE, BLOCK_T, HEAD_DIM, HF_MODE != 0, False, Q_FACTORS, IEEE, SPLIT_P, TMA)
    if full_end < end:  # the partial last block, masked (head factors: the prefetched tile is already masked)
        offs_t = full_end + offs_t0
        t_mask = offs_t < end
        if HF_MODE == 2:
            ak_next = _load_head_factor(AK, ak_base, offs_h, offs_t, h_mask, t_mask, stride_akt, stride_akh,
                                        R_K, RK_PAD)
            av_next = _load_head_factor(AV, av_base, offs_h, offs_t, h_mask, t_mask, stride_avt, stride_avh,
                                        R_V, RV_PAD)
        acc, m_i, l_i = _factor_block(
            q, qk_scale, acc, m_i, l_i, ak_next, av_next, AK, AV, BK, BV, bk_desc, bv_desc, ak_base, av_base, b64,
            full_end, offs_h, h_mask, offs_t, t_mask, offs_d,
            stride_akt, stride_akh, stride_bkb, stride_bkt, stride_bkr, stride_avt, stride_avh, stride_bvb,
            stride_bvt, stride_bvr,
            R_K, RK_PAD, R_V, RV_PAD, HEAD_TILE, BLOCK_T, HEAD_DIM, HF_MODE != 0, True, Q_FACTORS, IEEE, SPLIT_P, TMA)

    signal_dependents(PDL_SIGNAL == 1)
    _store_partial(PART_O, PART_LSE, acc, m_i, l_i, b64, offs_h, h_mask, pid_s, offs_d,
                   stride_pob, stride_poh, stride_pos, stride_plb, stride_plh)


@triton.jit
def _gqa_block(q, qk_scale, acc, m_i, l_i, BK, BV, bk_desc, bv_desc, b, g, t0, offs_t, t_mask, offs_d,
               stride_bkb, stride_bkt, stride_bkr, stride_bvb, stride_bvt, stride_bvr,
               IEEE: tl.constexpr, SPLIT_P: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One block of BLOCK_T tokens of group g for its heads (the query rows): online-softmax update."""
    bk = token_rows(BK, bk_desc, b, t0, g, offs_t, t_mask, offs_d, stride_bkb, stride_bkt, stride_bkr,
                    TMA, MASKED, BLOCK_T, HEAD_DIM)  # [BLOCK_T, D]
    logits = _dot(q, tl.trans(bk), IEEE) * qk_scale  # [H_PAD, BLOCK_T]
    if MASKED:
        logits = tl.where(t_mask[None, :], logits, float("-inf"))
    p, alpha, m_new, l_i = online_softmax(logits, m_i, l_i)  # p [H_PAD, BLOCK_T]
    bv = token_rows(BV, bv_desc, b, t0, g, offs_t, t_mask, offs_d, stride_bvb, stride_bvt, stride_bvr,
                    TMA, MASKED, BLOCK_T, HEAD_DIM)  # [BLOCK_T, D]
    acc = acc * alpha[:, None] + dot_probs(p, bv, IEEE, SPLIT_P)
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
    SPLIT_P: tl.constexpr, PDL: tl.constexpr, TMA: tl.constexpr,
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
                                   stride_bvr, IEEE, SPLIT_P, TMA, False, BLOCK_T, HEAD_DIM)
    if full_end < end:
        offs_t = full_end + offs_t0
        acc, m_i, l_i = _gqa_block(q, qk_scale, acc, m_i, l_i, BK, BV, bk_desc, bv_desc, b64, g, full_end, offs_t,
                                   offs_t < end, offs_d, stride_bkb, stride_bkt, stride_bkr, stride_bvb, stride_bvt,
                                   stride_bvr, IEEE, SPLIT_P, TMA, True, BLOCK_T, HEAD_DIM)

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


def merge_tile(num_splits: int, head_dim: int) -> tuple[int, int]:
    """(S_PAD, BLOCK_D) of the merge: all slices in one tile of at most 4,096 float32 (32 registers a thread)."""
    s_pad = max(16, _next_pow2(num_splits))
    return s_pad, max(1, min(head_dim, 4096 // s_pad))


# Launch defaults for the contextual kernel (set from the H200 sweep, benchmarks/RESULTS.md).
_DEFAULT_WAVES = 2  # one round of programs at the kernel's 2 programs per SM (register-bound)
_DEFAULT_RANK_2D = True
# The merge as a programmatic dependent launch (PDL): 0.3-1.0 us less for the contextual kernel (paper shape,
# B = 1, M = 2^19: 60.6-60.7 vs 61.0-61.2 us; B = 4, M = 2^17: 60.0 vs 60.7-61.1), but 0.7-1.0 us more after the
# GQA kernel (SmolLM2-135M, B = 1, M = 2^16: 20.3-20.7 vs 19.6-19.7); H200, 2026-11-28 23:57 UTC, 3 alternating reps.
_DEFAULT_PDL_FACTORS = True
_DEFAULT_PDL_FIXED = False


def _default_waves_gqa(head_dim: int, pairs: int) -> int:
    """GQA programs per SM for `pairs` (sequence, group) pairs: 4 at head dim <= 64 with >= 32 pairs (SmolLM2-135M,
    B = 16, M = 2^14: 57.6 vs 60.9 us with 2; B = 16, M = 2^16: 200.4 vs 219.1), else 2 (Llama-3-8B, B = 16,
    M = 2^14: 288.3 vs 295.2 us with 4). With few pairs the two tie (SmolLM2-135M, B = 1, M = 2^18: 56.5-56.8 us
    with 4, 56.7-57.3 with 2 in isolated repeats), so they keep the 2 of earlier builds. H200, 2026-11-28 UTC."""
    return 4 if head_dim <= 64 and pairs >= 32 else 2


def _default_head_tile(H: int, rank_one: bool) -> int:
    """Heads per program: all of them (bk/bv read once) up to 64; above, tiles of 32 (H = 78 padded to 96
    instead of 128, and no 8-warp programs; bk/bv re-read per tile, mostly from L2)."""
    return H if rank_one or H <= 64 else 32


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """SMs the split grids are sized for (2 off CUDA: the interpreter runs programs one by one anyway)."""
    return _sm_count(device.index or 0) if device.type == "cuda" else 2


def default_num_splits(device: torch.device, programs_per_split: int, T_cap: int, min_chunk: int,
                       waves: int = 4, round_down: bool = False) -> int:
    """Slices in the grid: `waves` programs per SM (latency hiding), never more than the capacity can fill.

    Depends on the capacity and the batch, not the length, so a decode loop keeps one grid (and one CUDA graph)
    until the cache doubles; each sequence then uses only the slices its runtime length fills. `round_down`
    keeps the grid within `waves` programs per SM (rounding up can start a nearly empty extra round of
    programs, each as long as the others: 1.4x slower at B = 16 on the H200), and then takes the power of two
    below where that drops at most 1/32 of the slices: the merge pads the slice count to a power of two, and
    block-aligned slices leave the last few programs idle anyway (H200, 132 SMs, paper shape B = 1: 264 -> 256
    slices, M = 2^19 58.8 vs 59.2 us, 2^18 34.7 vs 35.5, 2^16 15.6 vs 16.0; 2026-11-29 01:15 UTC, 3 rounds).
    """
    programs = waves * multiprocessors(device)
    per_seq = programs // programs_per_split if round_down else triton.cdiv(programs, programs_per_split)
    splits = max(1, min(per_seq, triton.cdiv(T_cap, min_chunk), 1024))
    pow2 = 1 << (splits.bit_length() - 1)
    if round_down and pow2 * 32 >= splits * 31:
        splits = pow2
    return splits


def decode_attention(
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
    num_splits: int | None = None,
    waves: int | None = None,
    min_chunk: int = 64,
    block_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    prefetch: bool | None = None,
    head_tile: int | None = None,
    rank_2d: bool | None = None,
    split_p: bool = False,
    pdl: bool | None = None,
    pdl_early: bool = False,
    tma: bool | None = None,
) -> Tensor:
    """FlashTPA decode launcher (inputs already validated by `flashtpa.triton_attention`).

    Args:
        q: [B, 1, H, D] full queries, or aq [B, 1, H, R_Q] with bq [B, 1, R_Q, D].
        ak, av: [B, T_cap, H, R_K], [B, T_cap, H, R_V], or both None (fixed head factors, G = R_K groups).
        bk, bv: [B, T_cap, R_K, D], [B, T_cap, R_V, D] cache views, last dim contiguous.
        kv_lens: [B] int32 valid tokens per sequence (read on the device; no host synchronisation).
        num_splits, waves, min_chunk, block_t, num_warps, num_stages, prefetch: launch parameters; the
            defaults were chosen by the sweep in benchmarks/kernel_timings.py on an H200.
        head_tile: heads per program for contextual / KV-only K/V (a power of two >= 16; default all heads).
        rank_2d: load each rank of the head factors as a 2-D tile of its own inside the block (contextual /
            KV-only, ranks > 1), instead of one [heads, tokens, ranks] tile split in registers.
        split_p: 16-bit inputs: the probabilities enter the value product as two cache-dtype terms (hi + lo),
            ~16 mantissa bits instead of 8 (`flashtpa._jit_common.dot_probs`).
        pdl: launch the merge as a programmatic dependent of the split kernel (its launch overlaps the split
            kernel's tail), where supported (`flashtpa._jit_common.pdl_supported`); default: contextual / KV-only.
        pdl_early: with PDL after the contextual / KV-only kernel, let the merge launch as that kernel starts
            (its programs wait on the device) instead of once every program has left its key loop.
        tma: load the token factors (bk / bv, or K / V of a group) of whole blocks through TMA descriptors
            (`flashtpa._jit_common.token_rows`; forcing as in `flashtpa._jit_common.token_descriptors`); default:
            fixed head factors at any head dim (Llama-3-8B shape B = 4, M = 2^18: 1025-1027 vs 1066-1076 us,
            SmolLM2-135M B = 4, M = 2^18: 202.7 vs 206.0-206.3; H200, 2026-11-29 00:55 UTC) and rank-1 factors
            (paper shape B = 16, M = 2^16: 105.7 vs 107.2 us; B = 4: 34.8 vs 35.6), not higher ranks (T6 H = 34,
            B = 16, M = 2^16: 361.2 vs 318.7; 00:27 UTC).

    Returns:
        [B, 1, H, D] in the dtype of bk.
    """
    B, T_cap, R_K, D = bk.shape
    R_V = bv.shape[2]
    fixed = ak is None
    H = q.shape[2] if q is not None else aq.shape[2]
    rank_one = not fixed and R_K == 1 and R_V == 1
    if fixed:
        n_groups = R_K
        h_pad = max(16, _next_pow2(H // n_groups))
        n_head_tiles = 1
    else:
        n_groups = 1
        if head_tile is None:
            head_tile = _default_head_tile(H, rank_one)
        h_pad = min(max(16, _next_pow2(head_tile)), max(16, _next_pow2(H)))
        n_head_tiles = triton.cdiv(H, h_pad)
    # Defaults from the H200 sweeps (benchmarks/RESULTS.md): rank-1 factors stream best in 128-token blocks;
    # higher ranks hold head-factor tiles in registers: 32-token blocks at 64 heads a program, 64 at <= 32;
    # GQA with D=128 likes 32-token blocks, D=64 64-token blocks.
    if block_t is None:
        if rank_one:
            block_t = 128
        elif fixed:
            block_t = 32 if D >= 128 else 64
        else:
            block_t = 64 if h_pad <= 32 else 32
    if num_warps is None:
        num_warps = 8 if h_pad >= 128 else 4
    if num_stages is None:
        num_stages = 3
    block_t = fit_block_t(block_t, 2 if fixed else R_K + R_V, D, bk.element_size(), num_stages)
    if prefetch is None:
        prefetch = h_pad <= 64  # at 128 heads a program the prefetched tiles cost more registers than they save
    if rank_2d is None:
        rank_2d = _DEFAULT_RANK_2D
    if prefetch and (rank_one or not rank_2d):
        hf_mode = 1
    else:
        hf_mode = 0 if rank_2d else 2
    if num_splits is None:
        if waves is None:
            waves = _default_waves_gqa(D, B * n_groups) if fixed else _DEFAULT_WAVES
        num_splits = default_num_splits(bk.device, B * n_groups * n_head_tiles, T_cap, min_chunk, waves,
                                        round_down=not fixed)
    dev = bk.device
    if pdl is None:
        pdl = _DEFAULT_PDL_FIXED if fixed else _DEFAULT_PDL_FACTORS
    pdl = pdl and pdl_supported(dev)
    part_o = torch.empty(B, H, num_splits, D, device=dev, dtype=torch.float32)  # [B, H, S, D]
    part_lse = torch.empty(B, H, num_splits, device=dev, dtype=torch.float32)  # [B, H, S]
    out = torch.empty(B, 1, H, D, device=dev, dtype=bk.dtype)
    ieee = bk.dtype == torch.float32
    if fixed:
        tma, bk_desc, bv_desc = token_descriptors(bk, bv, block_t, tma, pays=True, max_row_bytes=None)
        _decode_gqa_kernel[(B * n_groups, num_splits)](
            q, bk, bv, bk_desc, bv_desc, kv_lens, part_o, part_lse,
            q.stride(0), q.stride(2),
            bk.stride(0), bk.stride(1), bk.stride(2),
            bv.stride(0), bv.stride(1), bv.stride(2),
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            T_cap, H // n_groups, n_groups, num_splits, min_chunk, scale * LOG2E,
            HEAD_DIM=D, H_PAD=h_pad, BLOCK_T=block_t, IEEE=ieee, SPLIT_P=split_p and not ieee, PDL=pdl, TMA=tma,
            num_warps=num_warps, num_stages=num_stages,
        )
    else:
        R_Q = aq.shape[3] if aq is not None else 1
        dummy = bk  # the unused query pointers (Q_FACTORS keeps them unread)
        tma, bk_desc, bv_desc = token_descriptors(bk, bv, block_t, tma, pays=rank_one)
        # Head tiles vary fastest in the grid, so the programs re-reading one slice's bk/bv run together (L2).
        _decode_factor_kernel[(n_head_tiles, B, num_splits)](
            q if q is not None else dummy, aq if aq is not None else dummy, bq if bq is not None else dummy,
            ak, bk, av, bv, bk_desc, bv_desc, kv_lens, part_o, part_lse,
            q.stride(0) if q is not None else 0, q.stride(2) if q is not None else 0,
            aq.stride(0) if aq is not None else 0, aq.stride(2) if aq is not None else 0,
            bq.stride(0) if bq is not None else 0, bq.stride(2) if bq is not None else 0,
            ak.stride(0), ak.stride(1), ak.stride(2),
            bk.stride(0), bk.stride(1), bk.stride(2),
            av.stride(0), av.stride(1), av.stride(2),
            bv.stride(0), bv.stride(1), bv.stride(2),
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            T_cap, H, num_splits, min_chunk, scale * LOG2E / R_K,
            R_Q=R_Q, RQ_PAD=max(16, _next_pow2(R_Q)), R_K=R_K, RK_PAD=_next_pow2(R_K),
            R_V=R_V, RV_PAD=_next_pow2(R_V), HEAD_DIM=D, HEAD_TILE=h_pad, BLOCK_T=block_t,
            Q_FACTORS=q is None, HF_MODE=hf_mode, IEEE=ieee, SPLIT_P=split_p and not ieee,
            PDL_SIGNAL=(2 if pdl_early else 1) if pdl else 0, TMA=tma,
            num_warps=num_warps, num_stages=num_stages,
        )
    s_pad, block_d = merge_tile(num_splits, D)
    _decode_merge_kernel[(B, H, D // block_d)](
        part_o, part_lse, out,
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(2),
        num_splits, 1.0 if fixed else 1.0 / R_V,
        S_PAD=s_pad, BLOCK_D=block_d, PDL=pdl,
        num_warps=4, **({"launch_pdl": True} if pdl else {}),  # older Tritons know no launch_pdl option
    )
    return out
