"""Chunk caches: one retrieved chunk's factors, encoded on its own after the shared system-prompt prefix.

A chunk cache is a store entry of kind "chunk" beside the prefix pages, with their guarantees: a safetensors
blob written atomically (`FactorStore`'s write path: claim, admission under the budget, fsync, rename), verified
before use (checksum, header, names, dtypes, shapes) and quarantined when bad, evicted LRU (a chunk names no
parent, so it is always a leaf), spared while pinned. Its key is its own typed family, so it never matches a
page: H("tpa-rag/chunk", namespace, the prefix's token ids, the chunk's token ids, the reference position).
It is kept in the namespace's dtype (the model's cache dtype), so a page and a chunk share one layout check.

`tpa_core.assembly.place` moves a loaded chunk from its reference position to its place in a prompt.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from sqlalchemy import case, func, select, update

from tpa_core.store import blobs as blobfmt
from tpa_core.store.db import chunks as batches
from tpa_core.store.errors import PageCorrupt
from tpa_core.store.keys import _field, _int, _str, token_bytes
from tpa_core.store.maintenance import REF_COLUMNS, PageRef
from tpa_core.store.tables import READY, Entry

if TYPE_CHECKING:
    from torch import Tensor

    from tpa_core.store.store import FactorStore

log = logging.getLogger(__name__)

CHUNK_KIND = "chunk"


def chunk_key(namespace: str, prefix_ids: Sequence[int], chunk_ids: Sequence[int], reference: int) -> str:
    """The key of a chunk cache: the chunk's tokens encoded after `prefix_ids`, its first token at `reference`."""
    h = hashlib.sha256()
    h.update(_str("tpa-rag/chunk"))
    h.update(_str(namespace))
    h.update(_field(b"T", token_bytes(prefix_ids)))
    h.update(_field(b"T", token_bytes(chunk_ids)))
    h.update(_int(reference))
    return h.hexdigest()


class ChunkCaches:
    """Chunk caches in a `FactorStore` (same tables, folder, budget, pins and counters)."""

    def __init__(self, store: FactorStore) -> None:
        self.store = store

    def present(self, keys: Iterable[str]) -> set[str]:
        """Which of `keys` are ready chunk caches."""
        keys = sorted(set(keys))
        found: set[str] = set()
        with self.store.engine.connect() as conn:
            for batch in batches(keys):
                found.update(conn.execute(select(Entry.key).where(
                    Entry.key.in_(batch), Entry.kind == CHUNK_KIND, Entry.state == READY)).scalars())
        return found

    def load(self, namespace: str, key: str) -> dict[str, Tensor] | None:
        """The verified tensors of chunk cache `key` (`layers.{i}.{name} -> [T, ...]`), or None when it is
        missing, was evicted meanwhile, or failed verification (then it is quarantined, with a warning)."""
        with self.store.engine.connect() as conn:
            row = conn.execute(select(*REF_COLUMNS).where(Entry.key == key, Entry.kind == CHUNK_KIND,
                                                          Entry.state == READY)).first()
        if row is None:
            return None
        ref = PageRef(*row)
        try:
            tensors = blobfmt.read_page(self.store.blobs_dir / ref.path, sha256=ref.sha256,
                                        layout=self.store._layout(namespace), expect=ref.expect())
        except FileNotFoundError:
            return None
        except PageCorrupt as exc:
            self.store.session.corrupt += 1
            self.store._quarantine(ref.key, str(exc))
            return None
        with self.store.engine.begin() as conn:
            conn.execute(update(Entry).where(Entry.key == key).values(hits=Entry.hits + 1, last_access=time.time()))
        return tensors

    def save(self, namespace: str, key: str, reference: int, tensors: dict[str, Tensor]) -> str:
        """Write chunk cache `key` (tensors `[T, ...]` encoded with the chunk's first token at `reference`).
        Returns "written", "exists" or "rejected" (the budget is held by pinned or warm entries)."""
        return self.store._write_page(namespace, key, None, CHUNK_KIND, reference, tensors)

    def stats(self) -> dict[str, int]:
        """{"entries", "bytes", "pinned"} of the ready chunk caches."""
        with self.store.engine.connect() as conn:
            entries, nbytes, pinned = conn.execute(select(
                func.count(), func.coalesce(func.sum(Entry.nbytes), 0),
                func.coalesce(func.sum(case((Entry.pinned.is_(True), 1), else_=0)), 0),
            ).where(Entry.kind == CHUNK_KIND, Entry.state == READY)).one()
        return {"entries": int(entries), "bytes": int(nbytes), "pinned": int(pinned)}
