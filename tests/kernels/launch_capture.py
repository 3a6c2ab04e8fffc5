"""Record the kernel launches a FlashTPA launcher makes, without a GPU and without running a kernel.

The launcher runs on meta tensors (shapes and strides only) with every `*_kernel` of the flashtpa modules replaced
by a recorder, and with the device facts the defaults depend on (multiprocessors, PDL and TMA support) patched to a
chosen device profile. Each launch is recorded as its kernel, grid, launch options and scalar arguments (tensors,
descriptors and strides left out), which is what a change of the default launch parameters would alter.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

# name -> (multiprocessors, Hopper or later: PDL and TMA available)
PROFILES = {"cpu": (2, False), "h200": (132, True), "h100-pcie": (114, True)}

# form, H, (R_Q, R_K, R_V): every branch of the default launch parameters (rank 1 or not, heads per program up to
# 64 or tiles of 32, GQA group sizes, MHA and MQA as fixed head factors)
DECODE_SHAPES = [
    ("contextual", 32, (16, 1, 1)), ("contextual", 128, (16, 1, 1)), ("contextual", 5, (3, 3, 1)),
    ("contextual", 34, (6, 2, 2)), ("contextual", 78, (6, 2, 2)), ("contextual", 100, (2, 2, 2)),
    ("kv_only", 32, (0, 1, 1)), ("kv_only", 47, (0, 2, 2)), ("kv_only", 96, (0, 1, 2)),
    ("fixed", 9, (0, 3, 3)), ("fixed", 32, (0, 8, 8)), ("fixed", 32, (0, 32, 32)), ("fixed", 12, (0, 1, 1)),
]
PREFILL_SHAPES = [
    ("contextual", 32, (16, 1, 1)), ("contextual", 34, (6, 2, 2)), ("kv_only", 29, (0, 2, 2)),
    ("fixed", 32, (0, 32, 32)), ("fixed", 9, (0, 3, 3)),
]
# (D, dtype): the tensor-core dtype at the two head dims, float32 (halves the token block where shared memory is
# short) and float16
DTYPES = [(64, torch.bfloat16), (128, torch.bfloat16), (128, torch.float32), (16, torch.float16)]


def meta_inputs(form: str, B: int, N: int, H: int, D: int, T_cap: int, ranks: tuple[int, int, int],
                dtype: torch.dtype) -> dict:
    """Attention arguments as meta tensors laid out like the engine's cache views (layer 1 of 2)."""
    R_Q, R_K, R_V = ranks

    def cache(*tail: int) -> torch.Tensor:
        return torch.empty(2, B, T_cap, *tail, device="meta", dtype=dtype)[1]  # [B, T_cap, ...]

    meta = dict(device="meta", dtype=dtype)
    args = {"q": None, "aq": None, "bq": None, "ak": None, "av": None}
    if form == "contextual":
        args["aq"], args["bq"] = torch.empty(B, N, H, R_Q, **meta), torch.empty(B, N, R_Q, D, **meta)
    else:
        args["q"] = torch.empty(B, N, H, D, **meta)
    if form != "fixed":
        args["ak"], args["av"] = cache(H, R_K), cache(H, R_V)
    args["bk"], args["bv"] = cache(R_K, D), cache(R_V, D)
    args["kv_lens"] = torch.empty(B, device="meta", dtype=torch.int32)
    return args


def _scalar(value) -> bool:
    return isinstance(value, (bool, int, float, str)) or value is None


@contextmanager
def recorded_launches(profile: str) -> Iterator[list[dict]]:
    """Replace the kernels of every loaded flashtpa module by recorders and patch the device facts."""
    sms, hopper = PROFILES[profile]
    launches: list[dict] = []
    patched: list[tuple[object, str, object]] = []

    def patch(module, name: str, value) -> None:
        patched.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    class Recorder:
        def __init__(self, kernel) -> None:
            self.kernel = kernel

        def __getitem__(self, grid) -> Callable:
            def launch(*args, **kwargs) -> None:
                named = dict(zip(self.kernel.arg_names, args)) | kwargs
                params = {k: v for k, v in named.items()
                          if _scalar(v) and not k.startswith("stride_") and not k.endswith("_desc")}
                launches.append({"kernel": self.kernel.fn.__name__, "grid": list(grid), **params})
            return launch

    modules = [m for n, m in list(sys.modules.items()) if n == "flashtpa" or n.startswith("flashtpa.")]
    try:
        for module in modules:
            for name in dir(module):
                obj = getattr(module, name)
                if name.startswith("_") and name.endswith("_kernel") and hasattr(obj, "arg_names"):
                    patch(module, name, Recorder(obj))
            if hasattr(module, "multiprocessors"):
                patch(module, "multiprocessors", lambda device: sms)
            for name in ("pdl_supported", "tma_supported"):
                if hasattr(module, name):
                    patch(module, name, lambda device: hopper)
        yield launches
    finally:
        for module, name, value in reversed(patched):
            setattr(module, name, value)


def _group(kind: str, form: str, H: int, ranks: tuple[int, int, int], D: int, dtype: torch.dtype) -> str:
    return f"{kind}-{form}-H{H}-R{'.'.join(map(str, ranks))}-D{D}-{str(dtype).removeprefix('torch.')}"


def decode_cases() -> Iterator[tuple[str, str, dict, str]]:
    """(group, case id, meta inputs, profile) over the decode grid."""
    for form, H, ranks in DECODE_SHAPES:
        for D, dtype in DTYPES:
            group = _group("decode", form, H, ranks, D, dtype)
            for B in (1, 4, 16):
                for T_cap in (100, 1 << 16, 1 << 19):
                    for profile in PROFILES:
                        yield (group, f"{group}-B{B}-T{T_cap}-{profile}",
                               meta_inputs(form, B, 1, H, D, T_cap, ranks, dtype), profile)


def prefill_cases() -> Iterator[tuple[str, str, dict, str]]:
    """(group, case id, meta inputs, profile) over the prefill grid."""
    for form, H, ranks in PREFILL_SHAPES:
        for D, dtype in DTYPES:
            group = _group("prefill", form, H, ranks, D, dtype)
            for N, T_cap in ((2, 2), (17, 300), (255, 4096), (256, 256), (2048, 2048), (8192, 16384)):
                for profile in ("cpu", "h200"):
                    yield (group, f"{group}-N{N}-T{T_cap}-{profile}",
                           meta_inputs(form, 1, N, H, D, T_cap, ranks, dtype), profile)
