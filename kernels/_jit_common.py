"""Triton helpers shared by the decode and prefill kernels (imported only with the Triton backend)."""

from __future__ import annotations

import triton
import triton.language as tl

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
