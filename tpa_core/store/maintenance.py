"""Reporting and upkeep of the store: stats, verify every page, purge the quarantine, clear, tidy folders."""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, delete, func, select, update

from tpa_core.store import blobs as blobfmt
from tpa_core.store.errors import PageCorrupt
from tpa_core.store.eviction import Budget, usage
from tpa_core.store.tables import COUNTERS, PENDING, READY, Counter, Entry, Link, Namespace, Quarantined

if TYPE_CHECKING:
    from tpa_core.store.store import FactorStore

REF_COLUMNS = (Entry.key, Entry.namespace, Entry.parent, Entry.kind, Entry.start, Entry.n_tokens, Entry.nbytes,
               Entry.path, Entry.sha256)


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
    sha256: str

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


def _count(conn, model, *where) -> int:  # noqa: ANN001 - a Connection and a mapped class
    return conn.execute(select(func.count()).select_from(model).where(*where)).scalar_one()


def collect_stats(engine: Engine, budget: Budget) -> StoreStats:
    now = usage(engine)
    with engine.connect() as conn:
        counters = dict(conn.execute(select(Counter.name, Counter.value)).all())
        return StoreStats(entries=_count(conn, Entry, Entry.state == READY), bytes=now.total,
                          pinned_bytes=now.pinned, pending=_count(conn, Entry, Entry.state == PENDING),
                          namespaces=_count(conn, Namespace), quarantined=_count(conn, Quarantined),
                          budget_bytes=budget.budget_bytes,
                          **{name: int(counters.get(name, 0)) for name in COUNTERS})


def verify_all(store: "FactorStore") -> VerifyReport:
    """Read and check every ready entry of every namespace; quarantine the bad ones."""
    report = VerifyReport()
    with store.engine.connect() as conn:
        refs = [PageRef(*r) for r in conn.execute(select(*REF_COLUMNS).where(Entry.state == READY)
                                                  .order_by(Entry.namespace, Entry.start, Entry.key))]
    for ref in refs:
        report.entries += 1
        try:
            blobfmt.read_page(store.blobs_dir / ref.path, sha256=ref.sha256, expect=ref.expect(),
                              layout=store._layout(ref.namespace))
        except FileNotFoundError:
            with store.engine.connect() as conn:
                still = conn.execute(select(Entry.key).where(Entry.key == ref.key)).first()
            if still is None:  # evicted meanwhile: not checked after all
                report.entries -= 1
                continue
            store._quarantine(ref.key, "the blob file is missing")
            report.corrupt += 1
            continue
        except PageCorrupt as exc:
            store._quarantine(ref.key, str(exc))
            report.corrupt += 1
            continue
        report.ok += 1
        report.bytes += ref.nbytes
    with store.engine.connect() as conn:
        report.quarantined = _count(conn, Quarantined)
    return report


def purge_quarantine(engine: Engine, blobs_dir: Path) -> int:
    with engine.begin() as conn:
        rows = conn.execute(select(Quarantined.id, Quarantined.path)).all()
        conn.execute(delete(Quarantined).where(Quarantined.id.in_([r[0] for r in rows])))
    for _, path in rows:
        if path:
            (blobs_dir / path).unlink(missing_ok=True)
    return len(rows)


def drop_empty_folders(blobs_dir: Path) -> None:
    for root, dirs, files in os.walk(blobs_dir, topdown=False):
        if Path(root) != blobs_dir and not dirs and not files:
            try:
                os.rmdir(root)
            except OSError:
                pass  # a writer just put a file there


def clear(store: "FactorStore", *, include_pinned: bool) -> int:
    with store.engine.connect() as conn:
        rows = conn.execute(select(Entry.key, Entry.path, Entry.pinned).where(Entry.state == READY)).all()
    removed = sum(store._remove(k, p, pinned_ok=include_pinned) for k, p, pinned in rows
                  if include_pinned or not pinned)
    purge_quarantine(store.engine, store.blobs_dir)
    if include_pinned:
        with store.engine.begin() as conn:
            conn.execute(delete(Link))
            conn.execute(update(Counter).values(value=0))
        shutil.rmtree(store.blobs_dir / blobfmt.QUARANTINE_DIR, ignore_errors=True)
    return removed
