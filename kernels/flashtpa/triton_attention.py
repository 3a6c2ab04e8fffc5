"""The Triton backend of `flashtpa.dispatch.attention`: validate once, then decode (N = 1) or prefill (N > 1).

No host synchronisation: lengths stay on the device (so a CUDA graph can capture a decode step), which means
the kernels clamp a length past the buffer capacity instead of raising; the torch backend checks lengths.
"""

from __future__ import annotations

from torch import Tensor

from flashtpa.inputs import AttentionInputError, AttentionInputs, AttentionShape


def triton_supports(shape: AttentionShape) -> bool:
    """Whether the kernels handle these sizes: head dim a power of two in [16, 256] (tl.arange, tl.dot K >= 16)."""
    D = shape.D
    return 16 <= D <= 256 and D & (D - 1) == 0


def attention_triton(x: AttentionInputs, scale: float | None = None) -> Tensor:
    """Attention in factor space with the Triton kernels (same contract as `flashtpa.dispatch.attention`).

    Returns:
        [B, N, H, D] in the dtype of bk.

    Raises:
        AttentionInputError: bad shapes, tensors not on a GPU (outside the interpreter), unsupported head dim.
    """
    shape = x.check()
    if not triton_supports(shape):
        raise AttentionInputError(
            f"the Triton kernels need a power-of-two head dim in [16, 256], got D={shape.D}; use backend='torch'"
        )
    scale = shape.D ** -0.5 if scale is None else float(scale)
    if shape.N == 1:
        from flashtpa.triton_decode import decode_attention

        return decode_attention(x, scale)
    from flashtpa.triton_prefill import prefill_attention

    return prefill_attention(x, scale)
