"""Chunk caches: one retrieved chunk's factors, encoded on its own after the shared system-prompt prefix.

A chunk cache is a store entry of kind "chunk" beside the prefix pages, with their guarantees: a safetensors
blob written atomically (`FactorStore.write_entry`: the pages' path of claim, admission under the budget, fsync,
rename), verified before use (`FactorStore.read_entry`: checksum, header, names, dtypes, shapes) and quarantined
when bad, evicted LRU (a chunk names no parent, so it is always a leaf), spared while pinned. Its key is its own
typed family (`tpa_core.store.keys.chunk_key`), so it never matches a page.
It is kept in the namespace's dtype (the model's cache dtype), so a page and a chunk share one layout check.

`tpa_core.assembly.place` moves a loaded chunk from its reference position to its place in a prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy import case, func, select

from tpa_core.store.db import chunks as batches
from tpa_core.store.keys import chunk_key
from tpa_core.store.records import REF_COLUMNS, PageRef
from tpa_core.store.tables import READY, Entry

if TYPE_CHECKING:
    from torch import Tensor

    from tpa_core.store import FactorStore

log = logging.getLogger(__name__)

CHUNK_KIND = "chunk"
__all__ = ["CHUNK_KIND", "ChunkCaches", "chunk_key"]


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
        if ref.namespace != namespace:  # a key names its namespace; a mismatch is a caller's mix-up, not a hit
            return None
        return self.store.read_entry(ref)

    def save(self, namespace: str, key: str, reference: int, tensors: dict[str, Tensor]) -> str:
        """Write chunk cache `key` (tensors `[T, ...]` encoded with the chunk's first token at `reference`).
        Returns "written", "exists" or "rejected" (the budget is held by pinned or warm entries)."""
        return self.store.write_entry(namespace, key, CHUNK_KIND, reference, tensors)

    def stats(self) -> dict[str, int]:
        """{"entries", "bytes", "pinned"} of the ready chunk caches."""
        with self.store.engine.connect() as conn:
            entries, nbytes, pinned = conn.execute(select(
                func.count(), func.coalesce(func.sum(Entry.nbytes), 0),
                func.coalesce(func.sum(case((Entry.pinned.is_(True), 1), else_=0)), 0),
            ).where(Entry.kind == CHUNK_KIND, Entry.state == READY)).one()
        return {"entries": int(entries), "bytes": int(nbytes), "pinned": int(pinned)}
