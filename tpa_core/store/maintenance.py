"""Reporting and upkeep of the store: stats, verify every page, purge the quarantine, clear, tidy folders.

The store calls these with its engine, its folder and, where a step needs one of its own operations (read and
check a page, quarantine one, remove one), that operation as a callback: this module never imports the store.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, delete, func, select, update

from tpa_core.store.blobs import QUARANTINE_DIR
from tpa_core.store.db import chunks
from tpa_core.store.errors import PageCorrupt
from tpa_core.store.eviction import Budget, usage
from tpa_core.store.records import REF_COLUMNS, PageRef, StoreStats, VerifyReport
from tpa_core.store.tables import COUNTERS, PENDING, READY, Counter, Entry, Link, Namespace, Quarantined

log = logging.getLogger(__name__)


def _count(conn, model, *where) -> int:  # a Connection and a mapped class
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


def verify_all(engine: Engine, check: Callable[[PageRef], None],
               quarantine: Callable[[PageRef, str], None]) -> VerifyReport:
    """Check every ready entry of every namespace with `check(ref)` (raises `PageCorrupt` or
    `FileNotFoundError`); `quarantine(ref, reason)` the bad ones."""
    report = VerifyReport()
    with engine.connect() as conn:
        refs = [PageRef(*r) for r in conn.execute(select(*REF_COLUMNS).where(Entry.state == READY)
                                                  .order_by(Entry.namespace, Entry.start, Entry.key))]
    for ref in refs:
        report.entries += 1
        try:
            check(ref)
        except FileNotFoundError:
            with engine.connect() as conn:
                still = conn.execute(select(Entry.key).where(Entry.key == ref.key)).first()
            if still is None:  # evicted meanwhile: not checked after all
                report.entries -= 1
                continue
            quarantine(ref, "the blob file is missing")
            report.corrupt += 1
            continue
        except PageCorrupt as exc:
            quarantine(ref, str(exc))
            report.corrupt += 1
            continue
        report.ok += 1
        report.bytes += ref.nbytes
    with engine.connect() as conn:
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


def clear(engine: Engine, blobs_dir: Path, remove: Callable[[str, str, bool], bool], *,
          include_pinned: bool) -> int:
    """Delete every ready entry with `remove(key, path, pinned_ok)`, pinned ones (and every link, and the
    counters) too with `include_pinned`; purge the quarantine. Returns the entries deleted."""
    with engine.connect() as conn:
        rows = conn.execute(select(Entry.key, Entry.path, Entry.pinned).where(Entry.state == READY)).all()
    removed = sum(remove(k, p, include_pinned) for k, p, pinned in rows if include_pinned or not pinned)
    purge_quarantine(engine, blobs_dir)
    if include_pinned:
        with engine.begin() as conn:
            conn.execute(delete(Link))
            conn.execute(update(Counter).values(value=0))
        shutil.rmtree(blobs_dir / QUARANTINE_DIR, ignore_errors=True)
    return removed


def drop_other_formats(engine: Engine, blobs_dir: Path, format_version: int) -> int:
    """Delete the ready pages (rows, files, links) and the namespaces of every blob format other than
    `format_version`: this version never reads them (their namespaces are not its own) and would only carry
    their bytes. Logged once with the count. Returns the pages dropped."""
    old = select(Namespace.key).where(Namespace.format_version != format_version)
    with engine.connect() as conn:
        rows = conn.execute(select(Entry.key, Entry.path, Entry.nbytes)
                            .where(Entry.namespace.in_(old), Entry.state == READY)).all()
        stale_namespaces = conn.execute(old).scalars().all()
    if not rows and not stale_namespaces:
        return 0
    keys = [key for key, _, _ in rows]
    with engine.begin() as conn:
        for batch in chunks(keys):
            conn.execute(delete(Link).where(Link.key.in_(batch)))
            conn.execute(delete(Entry).where(Entry.key.in_(batch), Entry.state == READY))
        left = select(Entry.namespace).distinct()
        conn.execute(delete(Namespace).where(Namespace.format_version != format_version,
                                             Namespace.key.not_in(left)))
    for _, path, _ in rows:
        (blobs_dir / path).unlink(missing_ok=True)
    if rows:
        log.warning("store: dropped %d cached pages (%d bytes) of an earlier blob format, which this version does "
                    "not read; they are recomputed when next needed", len(rows), sum(n for _, _, n in rows))
    return len(rows)
