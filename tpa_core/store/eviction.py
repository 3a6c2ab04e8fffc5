"""Eviction and admission under a byte budget: a segmented LRU (SLRU), leaves before parents, pins spared.

Policy (why: a stream of one-off questions must not flush the warm document pages; LMCache#4663):
- Two segments. *Probation*: pages never reused since they were written (`hits == 0`). *Protected*: pages that
  served at least one restore. A new page always enters probation; one reuse promotes it.
- The protected segment may hold at most `protected_share` of the budget (default 80%); beyond that its least
  recently used pages are the first victims, so an old working set cannot freeze the cache for good.
- Eviction starts when the bytes on disk pass the high watermark (default 90% of the budget) and goes down to
  the low watermark (default 70%), so a busy store evicts in batches, not on every write.
- Victims, in order: protected pages over the protected share (LRU), then probation (LRU), then protected (LRU).
  Only leaves are victims - an entry no other entry names as its parent - so a chain is eaten from its end and a
  prefix never loses a middle page. Pinned entries are never victims, and neither are their ancestors (never
  leaves while the pinned entry exists).
- Admission: a new page is written only if, after writing it, the store could get back under the high
  watermark by evicting probation pages and protected pages over their share. When the rest is pinned or warm,
  the new page is refused (counted as `rejected`) instead of evicting warm pages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, and_, case, exists, func, select
from sqlalchemy.orm import aliased

from tpa_core.store.errors import StoreError
from tpa_core.store.tables import PENDING, READY, Entry

log = logging.getLogger(__name__)

_BATCH = 8


@dataclass(frozen=True)
class Budget:
    """Byte budget and watermarks (fractions of the budget)."""

    budget_bytes: int
    high_watermark: float = 0.9
    low_watermark: float = 0.7
    protected_share: float = 0.8

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise StoreError(f"the cache budget must be a positive number of bytes, got {self.budget_bytes}")
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise StoreError(
                f"cache watermarks need 0 < low <= high <= 1, got low={self.low_watermark} high={self.high_watermark}"
            )
        if not 0 < self.protected_share <= 1:
            raise StoreError(f"protected_share must be in (0, 1], got {self.protected_share}")

    @property
    def high(self) -> int:
        return int(self.budget_bytes * self.high_watermark)

    @property
    def low(self) -> int:
        return int(self.budget_bytes * self.low_watermark)

    @property
    def protected_cap(self) -> int:
        return int(self.budget_bytes * self.protected_share)


@dataclass(frozen=True)
class Usage:
    """Bytes by segment (ready and pending entries; pending ones count as they are about to be there)."""

    total: int
    pinned: int
    protected: int  # unpinned, hits > 0
    probation: int  # unpinned, hits == 0 (and pending)


def usage(engine: Engine) -> Usage:
    """Current bytes of the store per segment."""
    protected = and_(Entry.pinned.is_(False), Entry.hits > 0, Entry.state == READY)
    query = select(
        func.coalesce(func.sum(Entry.nbytes), 0),
        func.coalesce(func.sum(case((Entry.pinned.is_(True), Entry.nbytes), else_=0)), 0),
        func.coalesce(func.sum(case((protected, Entry.nbytes), else_=0)), 0),
    ).where(Entry.state.in_((READY, PENDING)))
    with engine.connect() as conn:
        total, pinned, prot = (int(v) for v in conn.execute(query).one())
    return Usage(total=total, pinned=pinned, protected=prot, probation=total - pinned - prot)


def admits(budget: Budget, now: Usage, nbytes: int) -> bool:
    """Whether a new page of `nbytes` may be written (see the module docstring)."""
    after = now.total + nbytes
    if after <= budget.high:
        return True
    reclaimable = now.probation + max(0, now.protected - budget.protected_cap)
    return after - reclaimable <= budget.high and nbytes <= budget.high


def _victims(engine: Engine, over_share: bool, limit: int) -> list[tuple[str, str, int, int]]:
    """The next eviction candidates `(key, path, nbytes, hits)`: unpinned ready leaves in victim order."""
    child = aliased(Entry)
    is_leaf = ~exists().where(child.parent == Entry.key, child.state.in_((READY, PENDING)))
    protected_first = 0 if over_share else 1
    segment = case((Entry.hits > 0, protected_first), else_=1 - protected_first)
    query = (
        select(Entry.key, Entry.path, Entry.nbytes, Entry.hits)
        .where(Entry.state == READY, Entry.pinned.is_(False), is_leaf)
        .order_by(segment, Entry.last_access, Entry.key)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [(k, p, int(n), int(h)) for k, p, n, h in conn.execute(query).all()]


def evict(
    engine: Engine, budget: Budget, remove: Callable[[str, str], bool], *, force: bool = False
) -> tuple[int, int]:
    """Evict down to the low watermark once the store is over the high one (or at once with `force`).

    `remove(key, path)` deletes one ready, unpinned entry and its file and says whether it did (another process
    may have taken it first). Returns (entries evicted, bytes freed).
    """
    now = usage(engine)
    if now.total <= budget.high and not (force and now.total > budget.low):
        return 0, 0
    count = freed = 0
    for _ in range(1_000_000):  # a bound, not a limit in practice: each round removes one entry or stops
        if now.total <= budget.low:
            break
        # Re-ranked after every removal: taking a leaf can make its parent the next leaf in line.
        batch = _victims(engine, now.protected > budget.protected_cap, _BATCH)
        if not batch:
            log.warning("store: %d bytes on disk over a low watermark of %d, but nothing left is evictable "
                        "(pinned or in use)", now.total, budget.low)
            break
        for key, path, nbytes, _hits in batch:
            if remove(key, path):  # False: another process took it first; try the next one
                count, freed = count + 1, freed + nbytes
                break
        now = usage(engine)
    if count:
        log.info("store: evicted %d pages (%d bytes)", count, freed)
    return count, freed
