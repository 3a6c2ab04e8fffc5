"""Page blobs: one safetensors file per page, streamed straight from and into tensor memory, verified as it streams.

A blob holds the tensors of one page - `layers.{i}.{name}` with shape `[T, ...]` (`bk [T, R_K, D]`,
`bv [T, R_V, D]`, `ak [T, H, R_K]`, `av [T, H, R_V]`) - and a string header: format, format_version, namespace,
key, kind, parent, start, n_tokens. It is a plain safetensors file (any safetensors reader opens it); loading one
can never run code (no pickle anywhere).

Each byte moves once each way. `write_page` writes the header and then the caller's tensors' own memory (views of
the live cache: no export copy, no serialized copy) to a temp file, hashing each piece right after writing it;
`read_page_into` reads each tensor's bytes straight into the caller's buffers (the live cache past its valid
length, or a staging buffer), hashing each piece right after reading it, while it is still in the CPU's cache.
The caller makes the bytes live only when the call returns: nothing unverified is ever used.

The integrity check is xxh3-128 of the whole file, kept in the index as "xxh3-128:<hex>": it detects damage (a
flipped bit, a truncated or swapped file) at memory speed, where sha256 would cost more than the read itself.
It is not a defence against someone who can write the data folder - they can rewrite the index too. Keys stay
sha256 (`tpa_core.store.keys`): they name content across machines.

Layout on disk: `{blobs}/{namespace[:16]}/{key[:2]}/{key}.safetensors`; temp files sit next to their target
as `{key}.{pid}.{random}.tmp` so the rename stays in one folder (one filesystem: atomic).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpa_core.store.errors import PageCorrupt
from tpa_core.store.keys import FORMAT_VERSION

if TYPE_CHECKING:
    import xxhash
    from torch import Tensor

BLOB_FORMAT = "tpa-rag-factor-page"
BLOB_SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
QUARANTINE_DIR = "quarantine"
CHECKSUM = "xxh3-128"
_MAX_HEADER = 16 * 1024 * 1024
_PIECE = 256 * 1024  # hashed right after it moves, while it is still in the CPU's L2 cache
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)

# torch dtype name -> safetensors dtype tag (the dtypes a factor cache can hold)
_DTYPE_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def blob_relpath(namespace: str, key: str) -> str:
    """Where a page lives, relative to the blobs folder (derived from the keys alone)."""
    return f"{namespace[:16]}/{key[:2]}/{key}{BLOB_SUFFIX}"


def layout_of(tensors: Mapping[str, Tensor]) -> dict[str, list]:
    """{name: [dtype, per-token shape]} of a page's tensors (the first dim is the token count)."""
    return {name: [str(t.dtype).removeprefix("torch."), list(t.shape[1:])] for name, t in sorted(tensors.items())}


def new_checksum() -> xxhash.xxh3_128:
    """A running checksum of a blob's bytes (feed it with `update`, finish with `checksum_text`)."""
    import xxhash

    return xxhash.xxh3_128()


def checksum_text(running: xxhash.xxh3_128) -> str:
    """The index's form of a checksum: "xxh3-128:<32 hex digits>"."""
    return f"{CHECKSUM}:{running.hexdigest()}"


def checksum_of(data: bytes | memoryview) -> str:
    """The checksum of a whole blob held in memory (tests and tools)."""
    running = new_checksum()
    running.update(data)
    return checksum_text(running)


def byte_view(tensor: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a flat, writable memoryview of its own memory (no copy)."""
    import torch

    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"byte_view needs a contiguous CPU tensor, got {tensor.device} {tuple(tensor.stride())}")
    flat = tensor.detach().reshape(-1).view(torch.uint8)  # [numel * itemsize]
    return memoryview(flat.numpy()).cast("B")


# ----- writing -------------------------------------------------------------------------------------------------
def encode_header(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> tuple[bytes, list[str]]:
    """The safetensors prefix of a page (8-byte length, JSON header padded to 8 bytes) and the tensor names in
    the order their bytes follow it. `meta` is the page identity (namespace, key, kind, start, n_tokens,
    parent); the format and its version are added."""
    order = sorted(tensors)
    table: dict[str, Any] = {"__metadata__": {"format": BLOB_FORMAT, "format_version": str(FORMAT_VERSION),
                                              **{k: str(v) for k, v in meta.items()}}}
    offset = 0
    for name in order:
        t = tensors[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPE_TAGS:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in a page (one of {sorted(_DTYPE_TAGS)})")
        size = t.numel() * t.element_size()
        table[name] = {"dtype": _DTYPE_TAGS[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes with trailing spaces
    return struct.pack("<Q", len(text)) + text, order


def page_nbytes(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> int:
    """The size of the blob `write_page` would write (known before writing, for admission control)."""
    prefix, _ = encode_header(tensors, meta)
    return len(prefix) + sum(t.numel() * t.element_size() for t in tensors.values())


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


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def write_atomic(path: Path, pieces: Iterable[bytes | memoryview], *, durable: bool = True) -> str:
    """Write the concatenation of `pieces` to `path` so that a crash leaves either no file at `path` or the
    complete file: temp file in the same folder -> write -> fsync -> rename -> fsync the folder. Each piece is
    hashed as it is written; returns the file's checksum. `durable=False` skips both fsyncs (tests only)."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    for attempt in range(3):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            break
        except FileNotFoundError:  # `cache gc` removed the empty folder between mkdir and open
            if attempt == 2:
                raise
    running = new_checksum()
    try:
        for piece in pieces:
            view = memoryview(piece).cast("B")
            for at in range(0, len(view), _PIECE):
                part = view[at:at + _PIECE]
                _write_all(fd, part)
                running.update(part)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)
    return checksum_text(running)


def write_page(path: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> tuple[int, str]:
    """Write one page atomically from its tensors' own memory. Returns (bytes written, checksum).

    `tensors` are `{name: [T, ...]}`, contiguous and on the CPU (views of a live cache are fine: nothing is
    copied before the write)."""
    prefix, order = encode_header(tensors, meta)
    views = [byte_view(tensors[name]) for name in order]
    checksum = write_atomic(path, [prefix, *views])
    return len(prefix) + sum(len(v) for v in views), checksum


# ----- reading -------------------------------------------------------------------------------------------------
def read_header(data: bytes) -> tuple[dict, int]:
    """Parse a safetensors header: ({name: {dtype, shape, data_offsets}, "__metadata__": {...}}, data start)."""
    if len(data) < 8:
        raise PageCorrupt(f"blob of {len(data)} bytes is too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise PageCorrupt(f"safetensors header length {n} does not fit a blob of {len(data)} bytes")
    return _parse_header(data[8:8 + n]), 8 + n


def _parse_header(text: bytes) -> dict:
    try:
        header = json.loads(text)
    except ValueError as exc:
        raise PageCorrupt(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise PageCorrupt("safetensors header is not a JSON object")
    return header


def _read_exact(fd: int, into: memoryview, running: xxhash.xxh3_128, what: str) -> None:
    """Fill `into` from `fd`, hashing each piece as it arrives; a short file is corrupt."""
    for at in range(0, len(into), _PIECE):
        part = into[at:at + _PIECE]
        got = 0
        while got < len(part):
            n = os.readv(fd, [part[got:]])
            if n == 0:
                raise PageCorrupt(f"blob ends inside {what} (truncated while being read)")
            got += n
        running.update(part)


def _open_regular(path: Path, nbytes: int) -> int:
    """Open a blob for reading without following a link or blocking (a FIFO put in its place must not hang the
    reader); it must be a regular file of the size the index recorded. FileNotFoundError passes through."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a symlink in the page's place; EACCES, ENXIO: not a readable file
        raise PageCorrupt(f"blob could not be opened: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PageCorrupt(f"blob is not a regular file (mode {stat.filemode(info.st_mode)})")
        if info.st_size != nbytes:
            raise PageCorrupt(f"blob has {info.st_size} bytes, the index says {nbytes} (truncated or replaced)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_table(header: dict, *, expect: Mapping[str, Any], layout: Mapping[str, list], data_bytes: int,
                 ) -> list[tuple[int, int, str]]:
    """Check the header against what the index expects; returns `(begin, end, name)` in data order, which tile
    the data section exactly (no gap, no overlap, nothing past its end)."""
    meta = header.pop("__metadata__", None)
    meta = meta if isinstance(meta, dict) else {}
    want = {"format": BLOB_FORMAT, "format_version": str(FORMAT_VERSION), **{k: str(v) for k, v in expect.items()}}
    for field, value in want.items():
        if meta.get(field) != value:
            raise PageCorrupt(f"header field {field!r} is {meta.get(field)!r}, expected {value!r}")
    if sorted(header) != sorted(layout):
        missing, extra = sorted(set(layout) - set(header)), sorted(set(header) - set(layout))
        raise PageCorrupt(f"tensor names differ from the namespace: missing {missing[:4]}, unexpected {extra[:4]}")
    n_tokens = int(want["n_tokens"])
    spans: list[tuple[int, int, str]] = []
    for name, (dtype, shape) in layout.items():
        entry = header[name]
        if not isinstance(entry, dict):
            raise PageCorrupt(f"{name}: header entry is not an object")
        if entry.get("dtype") != _DTYPE_TAGS.get(dtype):
            raise PageCorrupt(f"{name}: dtype {entry.get('dtype')!r}, expected {_DTYPE_TAGS.get(dtype)!r} ({dtype})")
        if entry.get("shape") != [n_tokens, *shape]:
            raise PageCorrupt(f"{name}: shape {entry.get('shape')}, expected {[n_tokens, *shape]}")
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in offsets)):
            raise PageCorrupt(f"{name}: data_offsets {offsets!r} are not two integers")
        size = n_tokens * _ITEMSIZE[entry["dtype"]]
        for dim in shape:
            size *= dim
        if offsets[1] - offsets[0] != size:
            raise PageCorrupt(f"{name}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                              f"the shape needs {size}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    at = 0
    for begin, end, name in spans:
        if begin != at:
            raise PageCorrupt(f"{name}: data starts at {begin}, expected {at} (a gap or an overlap)")
        at = end
    if at != data_bytes:
        raise PageCorrupt(f"the tensors hold {at} bytes, the blob's data section has {data_bytes}")
    return spans


def read_page_into(
    path: Path,
    dest: Mapping[str, memoryview],
    *,
    nbytes: int,
    checksum: str,
    expect: Mapping[str, Any],
    layout: Mapping[str, list],
) -> None:
    """Read one blob straight into `dest` (`{name: writable bytes of [n_tokens, *per-token shape]}`), verifying
    it as it streams; the one read path of every entry kind.

    Checked: a regular file (links are not followed, FIFOs do not block) of exactly `nbytes`; the header
    (`expect`: namespace, key, kind, start, n_tokens, parent; the format and its version); the tensor names,
    dtypes and shapes against `layout` (`{name: [dtype, per-token shape]}`) and that their bytes tile the file;
    the checksum of every byte. Raises `PageCorrupt` on any mismatch - `dest` then holds garbage the caller must
    not use - and `FileNotFoundError` when the file is gone (evicted by another process: a plain miss).
    """
    if not checksum.startswith(f"{CHECKSUM}:"):
        raise PageCorrupt(f"the index holds a checksum of another kind ({checksum[:12]}...), not {CHECKSUM}")
    fd = _open_regular(path, nbytes)
    try:
        running = new_checksum()
        prefix = bytearray(8)
        if nbytes < 8:
            raise PageCorrupt(f"blob of {nbytes} bytes is too short for a safetensors header")
        _read_exact(fd, memoryview(prefix), running, "the header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER or 8 + n > nbytes:
            raise PageCorrupt(f"safetensors header length {n} does not fit a blob of {nbytes} bytes")
        text = bytearray(n)
        _read_exact(fd, memoryview(text), running, "the header")
        spans = _check_table(_parse_header(bytes(text)), expect=expect, layout=layout, data_bytes=nbytes - 8 - n)
        for begin, end, name in spans:
            into = dest[name]
            if len(into) != end - begin:
                raise ValueError(f"destination of {name} has {len(into)} bytes, the page holds {end - begin}")
            _read_exact(fd, into, running, name)
    finally:
        os.close(fd)
    found = checksum_text(running)
    if found != checksum:
        raise PageCorrupt(f"checksum mismatch: file has {found[:25]}..., the index says {checksum[:25]}...")


def empty_page(layout: Mapping[str, list], n_tokens: int) -> dict[str, Tensor]:
    """Fresh CPU tensors `{name: [n_tokens, *per-token shape]}` for a page of `layout` (a staging area)."""
    import torch

    return {name: torch.empty((n_tokens, *shape), dtype=getattr(torch, dtype)) for name, (dtype, shape)
            in layout.items()}


def read_page(path: Path, *, nbytes: int, checksum: str, expect: Mapping[str, Any],
              layout: Mapping[str, list]) -> dict[str, Tensor]:
    """`read_page_into` fresh tensors: returns the verified page `{name: [n_tokens, ...]}` on the CPU."""
    tensors = empty_page(layout, int(expect["n_tokens"]))
    read_page_into(path, {name: byte_view(t) for name, t in tensors.items()}, nbytes=nbytes, checksum=checksum,
                   expect=expect, layout=layout)
    return tensors
