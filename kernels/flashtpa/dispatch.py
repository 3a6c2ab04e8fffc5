"""The one place that picks the attention backend: `attention`, the public entry point (docs/interfaces.md).

"auto" runs the Triton kernels on CUDA tensors and the torch reference everywhere else; "torch" or "triton"
forces one. Triton is imported only when the Triton backend is chosen.
"""

from __future__ import annotations

import functools

from torch import Tensor

from flashtpa.inputs import AttentionInputError, AttentionInputs
from flashtpa.reference import attention_reference

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton can be imported here (it is absent on some platforms)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device_is_cuda: bool) -> str:
    """Map "auto" to "triton" (CUDA with Triton installed) or "torch"; validate a forced choice."""
    if backend not in BACKENDS:
        raise AttentionInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device_is_cuda and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise AttentionInputError("backend='triton' was forced but Triton is not installed; use 'torch' or 'auto'")
    return backend


def attention(
    *,
    q: Tensor | None = None,
    aq: Tensor | None = None,
    bq: Tensor | None = None,
    ak: Tensor | None,
    bk: Tensor,
    av: Tensor | None,
    bv: Tensor,
    kv_lens: Tensor,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention in TPA factor space over a factor cache.

    Args:
        q, aq, bq, ak, bk, av, bv, kv_lens: the tensors of `flashtpa.inputs.AttentionInputs` (shapes there).
        scale: logit scale, default 1/sqrt(D).
        backend: "auto" | "torch" | "triton".

    Returns:
        [B, N, H, D] in the dtype of bk; the torch path takes a cache (bk, bv, ak, av) narrower than the queries
        and returns the queries' dtype (a float16 cache under a float32 model on the CPU).

    Raises:
        AttentionInputError: shapes, devices or lengths that do not fit the contract, or an unknown backend.
    """
    x = AttentionInputs(q=q, aq=aq, bq=bq, ak=ak, bk=bk, av=av, bv=bv, kv_lens=kv_lens)
    chosen = resolve_backend(backend, bk.is_cuda)
    D = bk.shape[-1]
    if backend == "auto" and not (16 <= D <= 256 and D & (D - 1) == 0):
        chosen = "torch"  # head dims the kernels do not tile run on the reference
    query = q if q is not None else bq
    if backend == "auto" and query is not None and query.dtype != bk.dtype:
        chosen = "torch"  # the kernels read queries and cache in one dtype
    if chosen == "torch":
        return attention_reference(x, scale)
    from flashtpa.triton_attention import attention_triton

    return attention_triton(x, scale)
