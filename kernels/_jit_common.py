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


@functools.lru_cache(maxsize=8)
def _pdl_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_supported(device: torch.device) -> bool:
    """Whether a dependent kernel may be launched programmatically (PDL) on `device`: CUDA on Hopper or later,
    with a Triton that has grid dependency control. The interpreter and older GPUs launch as usual."""
    return device.type == "cuda" and gdc_wait is not None and _pdl_capable(device.index or 0)


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
