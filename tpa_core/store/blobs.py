"""Page blobs: one safetensors file per page, written atomically, verified before use.

A blob holds the tensors of `FactorCache.export(seq, start, end)` unchanged - `layers.{i}.{name}` with shape
`[T, ...]` (`bk [T, R_K, D]`, `bv [T, R_V, D]`, `ak [T, H, R_K]`, `av [T, H, R_V]`) - and a string header:
format, format_version, namespace, key, kind, parent, start, n_tokens. safetensors only: loading a blob can never
run code (no pickle anywhere).

Layout on disk: `{blobs}/{namespace[:16]}/{key[:2]}/{key}.safetensors`; temp files sit next to their target
as `{key}.{pid}.{random}.tmp` so the rename stays in one folder (one filesystem: atomic).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tpa_core.store.errors import PageCorrupt
from tpa_core.store.keys import FORMAT_VERSION

if TYPE_CHECKING:
    from torch import Tensor

BLOB_FORMAT = "tpa-rag-factor-page"
BLOB_SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
QUARANTINE_DIR = "quarantine"
_MAX_HEADER = 16 * 1024 * 1024


def blob_relpath(namespace: str, key: str) -> str:
    """Where a page lives, relative to the blobs folder (derived from the keys alone)."""
    return f"{namespace[:16]}/{key[:2]}/{key}{BLOB_SUFFIX}"


def layout_of(tensors: Mapping[str, "Tensor"]) -> dict[str, list]:
    """{name: [dtype, per-token shape]} of an export dict (the first dim is the token count)."""
    return {name: [str(t.dtype).removeprefix("torch."), list(t.shape[1:])] for name, t in sorted(tensors.items())}


def encode_page(tensors: Mapping[str, "Tensor"], header: Mapping[str, str]) -> bytes:
    """The blob bytes of one page: the tensors (contiguous, CPU) and the string header."""
    from safetensors.torch import save

    meta = {"format": BLOB_FORMAT, "format_version": str(FORMAT_VERSION), **{k: str(v) for k, v in header.items()}}
    return save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, metadata=meta)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either no file at `path` or the complete file:
    temp file in the same folder -> write -> fsync -> rename -> fsync the folder."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    for attempt in range(3):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileNotFoundError:  # `cache gc` removed the empty folder between mkdir and open
            if attempt == 2:
                raise
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_header(data: bytes) -> tuple[dict, int]:
    """Parse a safetensors header: ({name: {dtype, shape, data_offsets}, "__metadata__": {...}}, data start)."""
    if len(data) < 8:
        raise PageCorrupt(f"blob of {len(data)} bytes is too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise PageCorrupt(f"safetensors header length {n} does not fit a blob of {len(data)} bytes")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as exc:
        raise PageCorrupt(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise PageCorrupt("safetensors header is not a JSON object")
    return header, 8 + n


def read_page(
    path: Path,
    *,
    sha256: str,
    expect: Mapping[str, str],
    layout: Mapping[str, list] | None,
) -> dict[str, "Tensor"]:
    """Read and verify one blob; returns its tensors `{name: [T, ...]}` on the CPU.

    Checked before anything is returned: the sha256 of the file's bytes, the header (`expect`: namespace, key,
    kind, start, n_tokens, and the format), the tensor names against `layout`, every dtype and every shape
    (`[n_tokens, *per-token shape]`). Raises `PageCorrupt` on any mismatch and `FileNotFoundError` when the
    file is gone (evicted by another process: a plain miss).
    """
    import torch
    from safetensors.torch import load

    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise PageCorrupt(f"checksum mismatch: file has sha256 {digest[:16]}..., the index says {sha256[:16]}...")
    header, _ = read_header(data)
    meta = header.get("__metadata__") or {}
    want = {"format": BLOB_FORMAT, "format_version": str(FORMAT_VERSION), **{k: str(v) for k, v in expect.items()}}
    for field, value in want.items():
        if meta.get(field) != value:
            raise PageCorrupt(f"header field {field!r} is {meta.get(field)!r}, expected {value!r}")
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise PageCorrupt(f"safetensors could not parse the blob: {exc}") from None
    n_tokens = int(want["n_tokens"])
    if layout is not None:
        if sorted(tensors) != sorted(layout):
            missing, extra = sorted(set(layout) - set(tensors)), sorted(set(tensors) - set(layout))
            raise PageCorrupt(f"tensor names differ from the namespace: missing {missing[:4]}, unexpected {extra[:4]}")
        for name, (dtype, shape) in layout.items():
            t = tensors[name]
            if t.dtype != getattr(torch, dtype):
                raise PageCorrupt(f"{name}: dtype {t.dtype}, expected torch.{dtype}")
            if list(t.shape) != [n_tokens, *shape]:
                raise PageCorrupt(f"{name}: shape {list(t.shape)}, expected {[n_tokens, *shape]}")
    else:
        for name, t in tensors.items():
            if t.dim() < 1 or t.shape[0] != n_tokens:
                raise PageCorrupt(f"{name}: shape {list(t.shape)} does not hold {n_tokens} tokens")
    return tensors
