"""Triton helpers shared by the decode and prefill kernels (imported only with the Triton backend)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # grid dependency control (programmatic dependent launch), Hopper and later; absent from older Tritons
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gdc_launch_dependents = gdc_wait = None
try:  # host-side TMA descriptors; absent from older Tritons
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

LOG2E = 1.4426950408889634  # the kernels' softmax runs in base 2: exp(x) = exp2(x * LOG2E)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """tl.dot, in exact float32 ("ieee") for float32 inputs, else the tensor-core default."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def dot_probs(p, v, IEEE: tl.constexpr, SPLIT_P: tl.constexpr):
    """p [M, T] float32 (softmax weights) times v [T, D] (cache dtype) -> [M, D] float32.

    p is rounded to v's dtype for the tensor cores (8 mantissa bits in bf16); with SPLIT_P the rounding error
    rides along as a second term, p = hi + lo, both in v's dtype, so ~16 bits of p reach the product.
    """
    hi = p.to(v.dtype)
    out = dot(hi, v, IEEE)
    if SPLIT_P:
        out += dot((p - hi.to(tl.float32)).to(v.dtype), v, IEEE)
    return out


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
        rows = desc.load([b.to(tl.int32), t0, r, 0]).reshape([BLOCK_T, HEAD_DIM])
    else:
        ptrs = X + b * stride_b + offs_t.to(tl.int64)[:, None] * stride_t + r * stride_r + offs_d[None, :]
        if MASKED:
            rows = tl.load(ptrs, mask=t_mask[:, None], other=0.0)
        else:
            rows = tl.load(ptrs)
    return rows


@functools.lru_cache(maxsize=8)
def _hopper_or_later(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_supported(device: torch.device) -> bool:
    """Whether a dependent kernel may be launched programmatically (PDL) on `device`: CUDA on Hopper or later,
    with a Triton that has grid dependency control. The interpreter and older GPUs launch as usual."""
    return device.type == "cuda" and gdc_wait is not None and _hopper_or_later(device.index or 0)


def tma_supported(device: torch.device) -> bool:
    """Whether the kernels may load through TMA descriptors on `device`: CUDA on Hopper or later, with a Triton
    that has host-side descriptors (the interpreter runs them too, when a caller forces them)."""
    return device.type == "cuda" and TensorDescriptor is not None and _hopper_or_later(device.index or 0)


# The factor kernels load through TMA by default only for token-factor rows of at most this many bytes (D = 64
# in bf16: one 128-byte swizzle span); wider rows were timed only in the GQA decode (D = 128, where TMA paid).
TMA_MAX_ROW_BYTES = 128


def _token_descriptor(x: torch.Tensor, block_t: int):
    """A TMA descriptor over a [B, T, R, D] cache view, one [1, block_t, 1, D] box a load, or None where TMA cannot
    address the view (base and every stride but the last 16-byte aligned, last dim contiguous)."""
    elem = x.element_size()
    aligned = x.data_ptr() % 16 == 0 and x.stride(-1) == 1 and all(s * elem % 16 == 0 for s in x.stride()[:-1])
    if TensorDescriptor is None or not aligned:
        return None
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, block_t, 1, x.shape[-1]])


def token_descriptors(bk: torch.Tensor, bv: torch.Tensor, block_t: int, tma: bool | None, pays: bool,
                      max_row_bytes: int | None = TMA_MAX_ROW_BYTES) -> tuple:
    """(use TMA, bk descriptor, bv descriptor) for a launch whose token blocks are `block_t` long.

    tma None: TMA where the caller measured it to pay (`pays`, for rows of at most `max_row_bytes`; None: any),
    where supported (`tma_supported`) and for views it can address; else pointer loads (descriptors None). True
    forces it (ValueError for a view it cannot address); False: off.
    """
    if tma is None:
        narrow = max_row_bytes is None or bk.shape[-1] * bk.element_size() <= max_row_bytes
        tma = pays and narrow and tma_supported(bk.device)
        forced = False
    else:
        forced = tma
    if not tma:
        return False, None, None
    bk_desc, bv_desc = _token_descriptor(bk, block_t), _token_descriptor(bv, block_t)
    if bk_desc is None or bv_desc is None:
        if forced:
            raise ValueError("tma=True needs bk / bv views with a 16-byte aligned base and strides")
        return False, None, None
    return True, bk_desc, bv_desc


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
