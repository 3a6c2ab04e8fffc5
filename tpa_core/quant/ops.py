"""The compiled ops (tpa_core/csrc): the GGUF matmul and the fused decode block, built once per machine, cached by
source hash.

`make setup` builds it (`python -m tpa_core.quant.build`); a later first use builds it too if it is missing. The
library lands in `$TPA_RAG_OPS_DIR` (default `~/.cache/tpa-rag/ops`) under a name that hashes the source, the
torch version, the compiler and the CPU's flags, so a change to any of them builds a new one and an old build is
never loaded by mistake. Without a C++ compiler `available()` is False and the caller runs float32 weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from tpa_core.errors import TPAError

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = (CSRC / "gguf_matmul.cpp", CSRC / "decode_block.cpp")  # one library
HEADERS = (CSRC / "gguf_matmul.h",)
# -ffp-contract=off: dequantization stays bit-identical to gguf's numpy arithmetic (no fused multiply-adds).
CXX_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++20",
             "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
_state: dict[str, object] = {"loaded": False, "error": None}


class OpsUnavailable(TPAError):
    """The compiled op could not be built or loaded (no compiler, a failed build)."""


def ops_dir() -> Path:
    return Path(os.environ.get("TPA_RAG_OPS_DIR") or Path.home() / ".cache" / "tpa-rag" / "ops").expanduser()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return "unknown"


def library_path(compiler: str) -> Path:
    """Where the build for this source, torch, compiler and CPU lives."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[:1]
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    for part in (torch.__version__, compiler, *version, _cpu_flags(), *CXX_FLAGS):
        digest.update(b"\0" + part.encode())
    return ops_dir() / f"tpa_gguf-{digest.hexdigest()[:20]}.so"


def build(*, force: bool = False) -> Path:
    """Compile the op unless this exact build exists; returns the library path. OpsUnavailable on failure."""
    compiler = _compiler()
    if compiler is None:
        raise OpsUnavailable("no C++ compiler found (set CXX, or install g++): quantized GGUF weights need the "
                             "compiled op; models run with float32 weights instead")
    target = library_path(compiler)
    if target.is_file() and not force:
        return target
    from torch.utils import cpp_extension  # imports setuptools (0.1 s): only when a build is needed

    target.parent.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [arg for p in cpp_extension.library_paths() for arg in (f"-L{p}", f"-Wl,-rpath,{p}")]
    handle, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(handle)
    command = [compiler, *CXX_FLAGS, *includes, *map(str, SOURCES), "-o", tmp, *libs, "-lc10", "-ltorch_cpu"]
    logger.warning("building the quantized-weights op with %s (once per machine, about a minute)", compiler)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        names = ", ".join(source.name for source in SOURCES)
        raise OpsUnavailable(f"building {names} failed ({compiler}, exit {result.returncode}):\n"
                             f"{result.stderr[-2000:]}")
    os.replace(tmp, target)
    return target


def load() -> None:
    """Build if needed and load the op into torch.ops.tpa_gguf; OpsUnavailable if that cannot be done."""
    if _state["loaded"]:
        return
    if _state["error"] is not None:
        raise OpsUnavailable(str(_state["error"]))
    try:
        path = build()
        torch.ops.load_library(str(path))
    except (OpsUnavailable, OSError, RuntimeError) as exc:
        _state["error"] = exc
        raise OpsUnavailable(str(exc)) from None
    _state["loaded"] = True


def load_built() -> bool:
    """Whether the op is loaded, loading this machine's build if one exists but never compiling it: for fast paths
    that have a slower fallback and must not start a minute-long build on first use."""
    if not _state["loaded"] and _state["error"] is None:
        compiler = _compiler()
        if compiler is None or not library_path(compiler).is_file():
            return False
        try:
            load()
        except OpsUnavailable:
            return False
    return bool(_state["loaded"])


def available() -> bool:
    """Whether the op is loaded or can be (builds it on first call when missing)."""
    try:
        load()
    except OpsUnavailable as exc:
        logger.warning("quantized GGUF weights unavailable: %s", exc)
        return False
    return True


def matmul(x: torch.Tensor, weight: torch.Tensor, type_id: int, cols: int, levels: int = 2,
           packed: bool = False) -> torch.Tensor:
    """x `[M, K]` float32 @ the GGUF rows `weight` `[N, row_bytes]` transposed -> `[M, N]` float32, x rounded to
    `levels` (1 or 2) int8 levels per 32 values. `packed`: `weight` is `repack`'s layout."""
    return torch.ops.tpa_gguf.matmul(x, weight, type_id, cols, levels, packed)


def packed_row_bytes(type_id: int, cols: int) -> int:
    """Bytes per row of `repack`'s layout for rows of `cols` values of this type; 0 if the type has none."""
    return torch.ops.tpa_gguf.packed_row_bytes(type_id, cols)


def fast_bf16_gemm() -> bool:
    """Whether this CPU multiplies bfloat16 matrices much faster than float32 ones: AMX tiles or AVX-512 BF16, which
    oneDNN uses for torch's bf16 GEMM (one [512 x 2048] x [2048 x 8192] product on one core: 20 ms against 120 ms
    in float32 with AMX, 79 ms against 160-194 ms with AVX-512 BF16 on an AMD EPYC; benchmarks/NOTES.md). Without
    either, a bf16 GEMM is slower than float32 (7.4x on an AVX2 CPU)."""
    flags = _cpu_flags().split()
    return ("amx_bf16" in flags or "avx512_bf16" in flags) and torch.backends.mkldnn.is_available()


def packed_group() -> int:
    """Rows per group of `repack`'s layout: a packed matrix has a multiple of this many rows, read a group at a
    time."""
    return torch.ops.tpa_gguf.packed_group()


def packs_fast() -> bool:
    """Whether this build's CPU runs the packed layout's own kernel (AVX-512); without it a packed product unpacks
    each group of rows first, slower than the file's layout."""
    return torch.ops.tpa_gguf.packed_simd()


def repack(weight: torch.Tensor, type_id: int, cols: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """The GGUF rows `weight` `[N, row_bytes]` (N a multiple of 16) in the row-interleaved layout of the decode
    kernel, `[N, packed_row_bytes]`; row i of the result is `weight[order[i]]` when `order` is given. Lossless."""
    return torch.ops.tpa_gguf.repack(weight, type_id, cols, order)


def unpack(packed: torch.Tensor, type_id: int, cols: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (int64 `[R]`) of a `repack`ed matrix in the file's layout, `[R, row_bytes]` uint8."""
    return torch.ops.tpa_gguf.unpack(packed, type_id, cols, rows)


def dequantize_into(weight: torch.Tensor, type_id: int, cols: int, out: torch.Tensor,
                    packed: bool = False) -> torch.Tensor:
    """Write the float32 rows of `weight` `[N, row_bytes]` (`repack`'s layout if `packed`) into `out` `[N, K]`;
    returns `out`."""
    torch.ops.tpa_gguf.dequantize(weight, type_id, cols, out, packed)
    return out
