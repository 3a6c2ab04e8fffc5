"""The one place that picks the attention backend (docs/interfaces.md, `flashtpa.dispatch.attention`).

"auto" runs the Triton kernels on CUDA tensors and the torch reference everywhere else; "torch" or "triton"
forces one. Triton is imported only when the Triton backend is chosen.
"""

from __future__ import annotations

import functools

from torch import Tensor

from flashtpa._checks import AttentionInputError
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
        q: [B, N, H, D] full queries (KV-only and fixed-head-factor forms), RoPE applied; or
        aq, bq: [B, N, H, R_Q], [B, N, R_Q, D] contextual query factors (bq with RoPE).
        ak, av: [B, T_cap, H, R_K], [B, T_cap, H, R_V] contextual head factors; both None = fixed head factors
            (GQA: R_K = R_V = G groups, head h reads group h // (H // G)).
        bk, bv: [B, T_cap, R_K, D], [B, T_cap, R_V, D] token factors (bk with RoPE), views into the cache.
        kv_lens: [B] int32 valid cache tokens per sequence, the N new included; query n sits at kv_lens - N + n.
        scale: logit scale, default 1/sqrt(D).
        backend: "auto" | "torch" | "triton".

    Returns:
        [B, N, H, D] in the dtype of bk.

    Raises:
        AttentionInputError: shapes, devices or lengths that do not fit the contract, or an unknown backend.
    """
    chosen = resolve_backend(backend, bk.is_cuda)
    D = bk.shape[-1]
    if backend == "auto" and not (16 <= D <= 256 and D & (D - 1) == 0):
        chosen = "torch"  # head dims the kernels do not tile run on the reference
    if chosen == "torch":
        return attention_reference(q=q, aq=aq, bq=bq, ak=ak, bk=bk, av=av, bv=bv, kv_lens=kv_lens, scale=scale)
    from flashtpa.triton_attention import attention_triton

    return attention_triton(q=q, aq=aq, bq=bq, ak=ak, bk=bk, av=av, bv=bv, kv_lens=kv_lens, scale=scale)
