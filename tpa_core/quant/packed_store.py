"""A resident model's packed matrices kept on disk in its model-cache entry, so that a later load maps them.

Rearranging a GGUF's matrices into the decode kernel's layout (`ops.repack`) takes about a second per GB on one
core, on every load; llama.cpp's load is about half a second for a 1B model. So the first load writes the packed
matrices to `packed.bin` in the model's cache folder (each at a page-aligned offset) and `packed.json` their
names, shapes and offsets under a layout version; a later load maps `packed.bin` copy-on-write (no copy, pages read
on first use, as the GGUF itself is read). A missing, short or other-version pair is ignored and rebuilt.
The entry's folder is named by the GGUF's fingerprint, so the packed bytes always belong to that file.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

LAYOUT_VERSION = "tpa-gguf-packed/1"  # ops.repack's layout; a change to it needs a new version
DATA_FILE, INDEX_FILE = "packed.bin", "packed.json"
_ALIGN = mmap.PAGESIZE


class PackedStore:
    """The packed matrices of one cache entry, mapped: `get(name, rows, row_bytes)` is a `[rows, row_bytes]` uint8
    view, or None where the store lacks that matrix."""

    def __init__(self, index: dict[str, dict], buffer: np.ndarray) -> None:
        self._index, self._buffer = index, buffer

    @classmethod
    def open(cls, folder: Path) -> PackedStore | None:
        """The folder's store, or None where it has none or one that does not check out (logged)."""
        try:
            meta = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or meta.get("layout") != LAYOUT_VERSION:
                return None
            index = meta["tensors"]
            size = (folder / DATA_FILE).stat().st_size
            if not isinstance(index, dict) or any(
                    not isinstance(e, dict) or not all(isinstance(e.get(k), int) and e[k] >= 0
                                                       for k in ("offset", "rows", "row_bytes"))
                    or e["offset"] + e["rows"] * e["row_bytes"] > size for e in index.values()):
                logger.warning("%s: the packed matrices' index does not match %s; repacking", folder, DATA_FILE)
                return None
            if size == 0:
                return cls(index, np.zeros(0, dtype=np.uint8))
            with open(folder / DATA_FILE, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("%s: packed matrices unreadable (%s); repacking", folder, exc)
            return None
        return cls(index, np.frombuffer(mapped, dtype=np.uint8))

    def get(self, name: str, rows: int, row_bytes: int) -> torch.Tensor | None:
        entry = self._index.get(name)
        if entry is None or (entry["rows"], entry["row_bytes"]) != (rows, row_bytes):
            return None
        start = entry["offset"]
        return torch.from_numpy(self._buffer[start:start + rows * row_bytes].reshape(rows, row_bytes))


def save(folder: Path, matrices: dict[str, torch.Tensor]) -> None:
    """Write `matrices` (name -> packed uint8 `[rows, row_bytes]`) as the folder's store, replacing any. A failure
    (a full disk, a read-only folder) is logged: the loaded model works without the store, the next load repacks."""
    tmp_data = tmp_index = None
    try:
        index: dict[str, dict] = {}
        handle, tmp_data = tempfile.mkstemp(prefix=".packed-", dir=folder)
        with os.fdopen(handle, "wb") as out:
            offset = 0
            for name, tensor in matrices.items():
                offset = -(-offset // _ALIGN) * _ALIGN
                out.seek(offset)
                out.write(tensor.contiguous().numpy().data)
                index[name] = {"offset": offset, "rows": tensor.shape[0], "row_bytes": tensor.shape[1]}
                offset += tensor.numel()
        handle, tmp_index = tempfile.mkstemp(prefix=".packed-", suffix=".json", dir=folder)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump({"layout": LAYOUT_VERSION, "tensors": index}, out)
        os.replace(tmp_data, folder / DATA_FILE)  # the data first: an index never names bytes that are not there
        os.replace(tmp_index, folder / INDEX_FILE)
    except OSError as exc:
        logger.warning("could not keep the packed matrices in %s (%s); the next load repacks them", folder, exc)
        for path in (tmp_data, tmp_index):
            if path is not None:
                Path(path).unlink(missing_ok=True)
