"""The GGUF container read directly: header, metadata decoded on demand, tensor infos, memory-mapped data.

gguf's `GGUFReader` builds numpy views for every metadata element up front: for a Llama-3 vocabulary (128k tokens,
280k merges) that is seconds and a few hundred MB before any weight is read. Here the header is walked once
(string arrays are skipped by their lengths), values are decoded when asked for, and tensor data are views of one
memory map. Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata
count; metadata entries (string key, u32 value type, value); tensor infos (string name, u32 n_dims, u64 dims
innermost first, u32 GGML type, u64 offset); padding to `general.alignment` (32 by default); the data.

Every count and length comes from the file, so each is checked against the bytes that remain: a damaged or
hostile file fails with TPAError instead of looping or reading out of bounds.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tpa_core.errors import TPAError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: np.bool_, 10: "<u8",
          11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: `shape` in PyTorch order (outermost first), GGML `type_id`, absolute byte `start`, `n_bytes`."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    start: int
    n_bytes: int


class _Damaged(Exception):
    pass


class GGUFContainer:
    """A GGUF file's header parsed, its bytes memory-mapped (`writable`: copy-on-write, never written back)."""

    def __init__(self, path: str | Path, *, writable: bool = False) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                self._mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY if writable else mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise TPAError(f"cannot map {self.path} ({exc})") from None
        self._map = np.frombuffer(self._mmap, dtype=np.uint8)
        self._size = self._map.size
        try:
            self._parse()
        except (_Damaged, struct.error, UnicodeDecodeError, ValueError) as exc:
            raise TPAError(f"{self.path} is not a readable GGUF file ({exc}); delete it and fetch or convert it "
                           f"again") from None

    # ----- parsing ---------------------------------------------------------------------------------------------
    def _take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self._pos + size > self._size:
            raise _Damaged(f"truncated at byte {self._pos}")
        value = struct.unpack_from(fmt, self._map, self._pos)[0]
        self._pos += size
        return value

    def _string(self) -> str:
        n = self._take("<Q")
        if self._pos + n > self._size:
            raise _Damaged(f"a string of {n} bytes at byte {self._pos} runs past the end")
        text = bytes(self._map[self._pos:self._pos + n]).decode("utf-8")
        self._pos += n
        return text

    def _skip_value(self, vtype: int) -> None:
        if vtype in _SCALARS:
            self._pos += struct.calcsize(_SCALARS[vtype])
        elif vtype == _STRING:
            n = self._take("<Q")
            self._pos += n
        elif vtype == _ARRAY:
            etype, count = self._take("<I"), self._take("<Q")
            if etype in _SCALARS:
                self._pos += count * struct.calcsize(_SCALARS[etype])
            elif etype == _STRING:
                if count * 8 > self._size - self._pos:
                    raise _Damaged(f"an array of {count} strings cannot fit in the file")
                self._pos = _skip_strings(self._map, self._pos, count, self._size)
            else:
                raise _Damaged(f"unsupported array element type {etype}")
        else:
            raise _Damaged(f"unknown metadata value type {vtype}")
        if self._pos > self._size:
            raise _Damaged("a metadata value runs past the end")

    def _parse(self) -> None:
        self._pos = 0
        if bytes(self._map[:4]) != b"GGUF":
            raise _Damaged("no GGUF magic")
        self._pos = 4
        version = self._take("<I")
        if version not in (2, 3):
            raise _Damaged(f"GGUF version {version} (versions 2 and 3 are read)")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        if n_tensors > self._size or n_kv > self._size:
            raise _Damaged(f"{n_tensors} tensors / {n_kv} metadata entries cannot fit in {self._size} bytes")
        self._kv: dict[str, tuple[int, int]] = {}  # key -> (value type, byte offset of the value)
        for _ in range(n_kv):
            key = self._string()
            vtype = self._take("<I")
            self._kv[key] = (vtype, self._pos)
            self._skip_value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._take("<I")
            if n_dims > 8:
                raise _Damaged(f"tensor {name} claims {n_dims} dimensions")
            dims = [self._take("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), self._take("<I"), self._take("<Q")))
        alignment = self.value("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise _Damaged(f"general.alignment is {alignment!r}")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, offset in infos:
            n_bytes = _tensor_bytes(name, shape, type_id)
            start = data_start + offset
            if start + n_bytes > self._size:
                raise _Damaged(f"tensor {name} ({n_bytes} bytes at {start}) runs past the end ({self._size} bytes)")
            self.tensors[name] = TensorInfo(name, shape, type_id, start, n_bytes)

    # ----- access ----------------------------------------------------------------------------------------------
    def key_names(self) -> list[str]:
        return list(self._kv)

    def value(self, key: str, default: Any = None) -> Any:
        """The metadata value of `key` (int, float, bool, str or a list of those), decoded now; `default` if
        absent."""
        if key not in self._kv:
            return default
        vtype, offset = self._kv[key]
        self._pos = offset
        return self._read_value(vtype)

    def _read_value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._take(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        etype, count = self._take("<I"), self._take("<Q")
        if etype in _SCALARS:
            size = count * struct.calcsize(_SCALARS[etype])
            array = np.frombuffer(self._map, dtype=_NUMPY[etype], count=count, offset=self._pos)
            self._pos += size
            return array.tolist()
        return [self._string() for _ in range(count)]

    def data(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes, a uint8 view of the mapped file."""
        return self._map[info.start:info.start + info.n_bytes]

    def release(self, info: TensorInfo) -> None:
        """Drop the tensor's pages from this process's memory (they stay in the page cache; a later read maps them
        again): for a tensor copied elsewhere, so that its file pages no longer count as the process's."""
        first = -(-info.start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the tensor only
        last = (info.start + info.n_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)


def _tensor_bytes(name: str, shape: tuple[int, ...], type_id: int) -> int:
    from tpa_core.ggml_types import GGML_TYPES

    if type_id not in GGML_TYPES:
        raise _Damaged(f"tensor {name} has the unknown GGML type {type_id}")
    _, block_values, block_bytes = GGML_TYPES[type_id]
    values = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if not shape or shape[-1] % block_values:
        raise _Damaged(f"tensor {name} of shape {list(shape)} is not whole {block_values}-value blocks")
    return values // block_values * block_bytes


_U64 = struct.Struct("<Q")


def _skip_strings(buf: Any, pos: int, count: int, size: int) -> int:
    """The position after `count` length-prefixed strings starting at `pos` (a tokenizer's vocabulary: tens of
    thousands, so one tight loop); _Damaged where one runs past `size`."""
    unpack = _U64.unpack_from
    for _ in range(count):
        if pos + 8 > size:
            raise _Damaged(f"truncated at byte {pos}")
        pos += 8 + unpack(buf, pos)[0]
    if pos > size:
        raise _Damaged(f"a string runs past the end at byte {pos}")
    return pos
