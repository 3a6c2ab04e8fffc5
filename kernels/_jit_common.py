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
