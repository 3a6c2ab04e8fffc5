"""Plain records the store's modules share: a page as the index knows it, the stats and the verify report.

They live apart from `tpa_core.store.store` so that the helper modules (maintenance, chunk entries) can use them
without importing the store itself: imports inside the package point from `store` down to these modules only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tpa_core.store.tables import Entry

REF_COLUMNS = (Entry.key, Entry.namespace, Entry.parent, Entry.kind, Entry.start, Entry.n_tokens, Entry.nbytes,
               Entry.path, Entry.checksum)


@dataclass(frozen=True)
class PageRef:
    """One ready entry as the index knows it (fields in the order of `REF_COLUMNS`)."""

    key: str
    namespace: str
    parent: str | None
    kind: str
    start: int
    n_tokens: int
    nbytes: int
    path: str
    checksum: str  # "<algorithm>:<hex digest>" of the blob file's bytes

    def expect(self) -> dict[str, Any]:
        """What the blob's header must say."""
        return {"namespace": self.namespace, "key": self.key, "kind": self.kind, "start": self.start,
                "n_tokens": self.n_tokens, "parent": self.parent or ""}


@dataclass
class StoreStats:
    entries: int
    bytes: int
    pinned_bytes: int
    pending: int
    namespaces: int
    quarantined: int
    budget_bytes: int
    hits: int
    misses: int
    tokens_reused: int
    tokens_requested: int
    pages_written: int
    rejected: int
    evicted: int

    @property
    def hit_rate(self) -> float:
        """Pages served / pages asked for, over the store's whole life (survives restarts)."""
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hit_rate": self.hit_rate}


@dataclass
class VerifyReport:
    """`entries` ready entries checked; `ok` passed; `corrupt` failed now (and were quarantined);
    `quarantined` pages in quarantine after the run (earlier ones included); `bytes` of the entries that passed."""

    entries: int = 0
    ok: int = 0
    corrupt: int = 0
    quarantined: int = 0
    bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
