"""Inputs for the attention tests: factor tensors laid out as FactorCache views, garbage past every length.

The cache buffers are views into one `[L, B, T_cap, ...]` storage (layer 1 of 2), so the B and T strides are the
storage's, as in the engine; positions >= kv_lens[b] hold NaN so a kernel that reads them fails loudly.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor


def _layer_view(B: int, T_cap: int, tail: tuple[int, ...], dtype: torch.dtype, device: str,
                gen: torch.Generator) -> Tensor:
    # [L, B, T_cap, ...]
    storage = torch.randn(2, B, T_cap, *tail, generator=gen, dtype=torch.float32).to(dtype).to(device)
    return storage[1]  # [B, T_cap, ...] view, B stride = T_cap * prod(tail)


def make_inputs(
    *,
    form: str,
    B: int,
    N: int,
    H: int,
    D: int,
    T_cap: int,
    kv_lens: list[int],
    R_Q: int = 4,
    R_K: int = 2,
    R_V: int = 2,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    poison: bool = True,
) -> dict[str, Tensor | None]:
    """Keyword arguments for `attention` in one of the forms "contextual", "kv_only", "fixed".

    For "fixed", R_K = R_V is the number of groups G and must divide H.
    """
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    args: dict[str, Tensor | None] = {"q": None, "aq": None, "bq": None}
    if form == "contextual":
        args["aq"], args["bq"] = rnd(B, N, H, R_Q), rnd(B, N, R_Q, D)
    else:
        args["q"] = rnd(B, N, H, D)
    if form == "fixed":
        assert R_K == R_V and H % R_K == 0
        args["ak"], args["av"] = None, None
    else:
        args["ak"] = _layer_view(B, T_cap, (H, R_K), dtype, device, gen)
        args["av"] = _layer_view(B, T_cap, (H, R_V), dtype, device, gen)
    args["bk"] = _layer_view(B, T_cap, (R_K, D), dtype, device, gen)
    args["bv"] = _layer_view(B, T_cap, (R_V, D), dtype, device, gen)
    if poison:
        for name in ("ak", "bk", "av", "bv"):
            t = args[name]
            if t is None:
                continue
            for b, n_b in enumerate(kv_lens):
                t[b, n_b:] = float("nan")
    args["kv_lens"] = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    return args


def decode_config(x, **fields):
    """`default_decode_config(x)` with some fields given (a test's launch): min_chunk, head_tile and waves are
    passed to the default function, since the other fields follow from them; the rest replace fields."""
    from flashtpa.triton_decode import default_decode_config

    pins = {k: fields.pop(k) for k in ("min_chunk", "head_tile", "waves") if k in fields}
    return replace(default_decode_config(x, **pins), **fields)


def prefill_config(x, **fields):
    """`default_prefill_config(x)` with some fields replaced (a test's launch)."""
    from flashtpa.triton_prefill import default_prefill_config

    return replace(default_prefill_config(x), **fields)


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives NaN, which fails every tolerance)."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    return float((out64 - ref64).norm() / ref64.norm())


# Relative-error tolerances (||out - ref|| / ||ref|| against the float64 oracle), one per kind of run:
TOLERANCES = {
    # float64 inputs: the reference computes in float64, only summation order differs.
    torch.float64: 1e-12,
    # float32 inputs: float32 accumulation (reference) or IEEE float32 dots (kernels): far below 1e-5.
    torch.float32: 1e-5,
    # float16 operands: Q and the softmax weights are rounded to 11 bits before the dots (output too).
    torch.float16: 2e-3,
    # bfloat16 on the GPU: the target (8-bit mantissa for Q, p and the output).
    torch.bfloat16: 3e-3,
}
