"""Host-side helpers shared by the Triton launchers: sizes, device capabilities, TMA descriptors."""

from __future__ import annotations

import functools

import torch

try:  # host-side TMA descriptors; absent from older Tritons
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

from flashtpa.jit.common import gdc_wait

LOG2E = 1.4426950408889634  # the kernels' softmax runs in base 2: exp(x) = exp2(x * LOG2E)

# Shared memory the software pipeliner may fill with bk/bv blocks (an H200 SM has 228 KB; leave room for the rest).
PIPELINE_SMEM_BUDGET = 160 * 1024

# TMA pays for the factor kernels' token-factor rows of at most this many bytes (D = 64 in bf16: one 128-byte
# swizzle span); wider rows were timed only in the GQA decode, where TMA paid at D = 128 too.
TMA_MAX_ROW_BYTES = 128


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (x - 1).bit_length())


def fit_block_t(block_t: int, n_rank_tiles: int, head_dim: int, elem_size: int, num_stages: int) -> int:
    """Halve the token block until the pipelined bk/bv tiles (one per rank, per stage) fit in shared memory.

    Triton stages every load that feeds tl.dot through shared memory, so the footprint is
    n_rank_tiles * block_t * head_dim * elem_size * num_stages; high ranks (R = 16) or float32 need smaller blocks.
    """
    while block_t > 16 and n_rank_tiles * block_t * head_dim * elem_size * num_stages > PIPELINE_SMEM_BUDGET:
        block_t //= 2
    return block_t


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """SMs the split grids are sized for (2 off CUDA: the interpreter runs programs one by one anyway)."""
    return _sm_count(device.index or 0) if device.type == "cuda" else 2


@functools.lru_cache(maxsize=8)
def _hopper_or_later(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_supported(device: torch.device) -> bool:
    """Whether a dependent kernel may be launched programmatically (PDL) on `device`: CUDA on Hopper or later,
    with a Triton that has grid dependency control. The interpreter and older GPUs launch as usual."""
    return device.type == "cuda" and gdc_wait is not None and _hopper_or_later(device.index or 0)


def tma_supported(device: torch.device) -> bool:
    """Whether the kernels may load through TMA descriptors on `device`: CUDA on Hopper or later, with a Triton
    that has host-side descriptors (the interpreter runs them too, when a config asks for them)."""
    return device.type == "cuda" and TensorDescriptor is not None and _hopper_or_later(device.index or 0)


def tma_addressable(x: torch.Tensor) -> bool:
    """Whether a TMA descriptor can address the cache view x: base and every stride but the last 16-byte aligned,
    last dim contiguous, and a Triton with host-side descriptors."""
    elem = x.element_size()
    aligned = x.data_ptr() % 16 == 0 and x.stride(-1) == 1 and all(s * elem % 16 == 0 for s in x.stride()[:-1])
    return TensorDescriptor is not None and aligned


def default_tma(bk: torch.Tensor, bv: torch.Tensor, pays: bool,
                max_row_bytes: int | None = TMA_MAX_ROW_BYTES) -> bool:
    """Whether a launch loads its token factors through TMA by default: where it was measured to pay (`pays`, for
    rows of at most `max_row_bytes`; None: any), where the device supports it and the views allow it."""
    narrow = max_row_bytes is None or bk.shape[-1] * bk.element_size() <= max_row_bytes
    return pays and narrow and tma_supported(bk.device) and tma_addressable(bk) and tma_addressable(bv)


def token_descriptors(bk: torch.Tensor, bv: torch.Tensor, block_t: int, tma: bool) -> tuple:
    """(bk descriptor, bv descriptor) over [B, T, R, D] cache views, one [1, block_t, 1, D] box a load; (None,
    None) without `tma`.

    Raises:
        ValueError: `tma` for a view a descriptor cannot address (`tma_addressable`).
    """
    if not tma:
        return None, None
    if not (tma_addressable(bk) and tma_addressable(bv)):
        raise ValueError("a config with tma=True needs bk / bv views with a 16-byte aligned base and strides")
    return tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), [1, block_t, 1, x.shape[-1]]) for x in (bk, bv))
