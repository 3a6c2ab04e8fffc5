"""Triton helpers shared by the decode and prefill kernels (imported only with the Triton backend)."""

from __future__ import annotations

import triton
import triton.language as tl

try:  # grid dependency control (programmatic dependent launch), Hopper and later; absent from older Tritons
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """tl.dot, in exact float32 ("ieee") for float32 inputs, else the tensor-core default."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def dot_probs(p, v, IEEE: tl.constexpr):
    """p [M, T] float32 (softmax weights) times v [T, D] (cache dtype) -> [M, D] float32, p rounded to v's dtype
    for the tensor cores (a hi + lo split of p cut the bf16 error but not the end-to-end agreement:
    benchmarks/NOTES.md, "Dropped")."""
    return dot(p.to(v.dtype), v, IEEE)


@triton.jit
def online_softmax(logits, m_i, l_i):
    """One block's online-softmax step in base 2: logits [ROWS, T] (masked ones -inf, every row with one finite),
    running max m_i and sum l_i [ROWS] -> (p [ROWS, T], alpha = the factor on the old accumulator, m_new, l_new)."""
    m_new = tl.maximum(m_i, tl.max(logits, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(logits - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def token_rows(X, desc, b, t0, r, offs_t, t_mask, offs_d, stride_b, stride_t, stride_r,
               TMA: tl.constexpr, MASKED: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rank (or group) r of sequence b's token factors (bk or bv) for the block at t0: [BLOCK_T, D], cache dtype.

    Blocks wholly inside the valid range load unmasked, through the TMA descriptor `desc` with TMA (one bulk copy
    a block, no per-thread addresses); a block reaching past it (MASKED) loads through pointers, its rows past
    `t_mask` reading 0 (TMA would read the cache's unwritten rows there, and 0 * NaN poisons the value product).
    """
    if TMA and not MASKED:
        rows = desc.load([b.to(tl.int32), t0, r, 0]).reshape([BLOCK_T, HEAD_DIM])  # [1, BLOCK_T, 1, D] box
    else:
        ptrs = X + b * stride_b + offs_t.to(tl.int64)[:, None] * stride_t + r * stride_r + offs_d[None, :]
        if MASKED:
            rows = tl.load(ptrs, mask=t_mask[:, None], other=0.0)
        else:
            rows = tl.load(ptrs)
    return rows


@triton.jit
def signal_dependents(PDL: tl.constexpr):
    """PDL: let the next kernel in the stream start launching (its programs wait in `wait_for_primary`)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait_for_primary(PDL: tl.constexpr):
    """PDL: block until the previous kernel in the stream has finished and its writes are visible."""
    if PDL:
        gdc_wait()
