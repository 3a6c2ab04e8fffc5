"""The inputs of one attention call and their checks, shared by every backend (`flashtpa.dispatch.attention`).

Only shapes, dtypes and devices are checked here: nothing reads tensor values, so the checks never synchronise
with the GPU and a CUDA graph can capture a call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class AttentionInputError(ValueError):
    """The tensors given to `attention` do not fit the contract; the message names the tensor and the mismatch."""


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """The tensors of one attention call over a factor cache (docs/interfaces.md).

    Queries, one of:
        q: [B, N, H, D] full queries (KV-only and fixed-head-factor forms), RoPE applied;
        aq, bq: [B, N, H, R_Q], [B, N, R_Q, D] contextual query factors (bq with RoPE).
    Cache (views into `FactorCache` storage, last dim contiguous):
        ak, av: [B, T_cap, H, R_K], [B, T_cap, H, R_V] contextual head factors; both None = fixed head factors
            (GQA: R_K = R_V = G groups, head h reads group h // (H // G));
        bk, bv: [B, T_cap, R_K, D], [B, T_cap, R_V, D] token factors (bk with RoPE).
        kv_lens: [B] int32 valid cache tokens per sequence, the N new included; query n sits at kv_lens - N + n.
    """

    bk: Tensor
    bv: Tensor
    kv_lens: Tensor
    q: Tensor | None = None
    aq: Tensor | None = None
    bq: Tensor | None = None
    ak: Tensor | None = None
    av: Tensor | None = None

    def check(self) -> AttentionShape:
        """Validate the tensors against each other and return the call's sizes.

        Raises:
            AttentionInputError: a tensor is missing, has the wrong shape, dtype or device.
        """
        return _check(self)


@dataclass(frozen=True)
class AttentionShape:
    """The sizes of one attention call.

    B batch, N new tokens per sequence, H heads, D head dim, T_cap cache capacity, ranks R_Q (0 for full
    queries), R_K, R_V. `contextual` is False for fixed head factors (then G = R_K groups).
    """

    B: int
    N: int
    H: int
    D: int
    T_cap: int
    R_Q: int
    R_K: int
    R_V: int
    contextual: bool

    @property
    def full_query(self) -> bool:
        return self.R_Q == 0


def _expect(name: str, t: Tensor, shape: tuple[int | None, ...]) -> None:
    if t.dim() != len(shape):
        raise AttentionInputError(f"{name} must have {len(shape)} dims {shape}, got shape {tuple(t.shape)}")
    for want, got in zip(shape, t.shape):
        if want is not None and want != got:
            raise AttentionInputError(f"{name} must have shape {shape} (None = any), got {tuple(t.shape)}")


def _check(x: AttentionInputs) -> AttentionShape:
    """The checks of `AttentionInputs.check`."""
    q, aq, bq, ak, bk, av, bv, kv_lens = x.q, x.aq, x.bq, x.ak, x.bk, x.av, x.bv, x.kv_lens
    if bk is None or bv is None or kv_lens is None:
        raise AttentionInputError("bk, bv and kv_lens are required")
    if (q is None) == (aq is None and bq is None):
        raise AttentionInputError("give exactly one of q or (aq, bq)")
    if q is None and (aq is None or bq is None):
        raise AttentionInputError("contextual queries need both aq and bq")
    if (ak is None) != (av is None):
        raise AttentionInputError("ak and av must both be given (contextual K/V) or both be None (fixed head factors)")
    if bk.dim() != 4:
        raise AttentionInputError(f"bk must be [B, T_cap, R_K, D], got shape {tuple(bk.shape)}")
    B, T_cap, R_K, D = bk.shape
    _expect("bv", bv, (B, T_cap, None, D))
    R_V = bv.shape[2]
    if q is not None:
        if q.dim() != 4:
            raise AttentionInputError(f"q must be [B, N, H, D], got shape {tuple(q.shape)}")
        N, H = q.shape[1], q.shape[2]
        _expect("q", q, (B, N, H, D))
        R_Q = 0
    else:
        assert aq is not None and bq is not None
        if aq.dim() != 4:
            raise AttentionInputError(f"aq must be [B, N, H, R_Q], got shape {tuple(aq.shape)}")
        N, H, R_Q = aq.shape[1], aq.shape[2], aq.shape[3]
        _expect("aq", aq, (B, N, H, R_Q))
        _expect("bq", bq, (B, N, R_Q, D))
    contextual = ak is not None
    if contextual:
        assert av is not None
        _expect("ak", ak, (B, T_cap, H, R_K))
        _expect("av", av, (B, T_cap, H, R_V))
    else:
        if R_K != R_V:
            raise AttentionInputError(f"fixed head factors need R_K == R_V (= groups G), got {R_K} and {R_V}")
        if H % R_K != 0:
            raise AttentionInputError(f"fixed head factors need the groups G = {R_K} to divide the heads H = {H}")
    _expect("kv_lens", kv_lens, (B,))
    if kv_lens.dtype not in (torch.int32, torch.int64):
        raise AttentionInputError(f"kv_lens must be int32, got {kv_lens.dtype}")
    if N < 1 or T_cap < 1:
        raise AttentionInputError(f"need at least one query and one cache slot, got N={N}, T_cap={T_cap}")
    named = {"q": q, "aq": aq, "bq": bq, "ak": ak, "bk": bk, "av": av, "bv": bv}
    for name, t in named.items():
        if t is None:
            continue
        if t.device != bk.device:
            raise AttentionInputError(f"{name} is on {t.device}, bk on {bk.device}: all tensors must share a device")
        if not t.is_floating_point():
            raise AttentionInputError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.stride(-1) != 1 and t.shape[-1] != 1:
            raise AttentionInputError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    if kv_lens.device != bk.device:
        raise AttentionInputError(f"kv_lens is on {kv_lens.device}, the factors on {bk.device}")
    return AttentionShape(B=B, N=N, H=H, D=D, T_cap=T_cap, R_Q=R_Q, R_K=R_K, R_V=R_V, contextual=contextual)


def check_lengths(lens: list[int], N: int, T_cap: int) -> None:
    """Check host-side lengths: every sequence holds its N new tokens and fits the buffers."""
    for b, n_b in enumerate(lens):
        if n_b < N or n_b > T_cap:
            raise AttentionInputError(
                f"kv_lens[{b}] = {n_b} must lie in [N, T_cap] = [{N}, {T_cap}] (the N new tokens are in the cache)"
            )
