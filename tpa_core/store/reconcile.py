"""Startup reconciliation: bring the index and the blobs folder back into agreement after any crash.

- pending rows of writers that are gone (their process died mid-write) are dropped, with their files;
- temp files nobody is writing any more are removed;
- blob files without a row (orphans) are removed;
- ready rows whose file is missing are dropped; a ready row whose file has the wrong size is quarantined.

Safe while other processes read and write: files are listed *before* rows are read, and a writer always creates
its pending row before its temp file, so a live writer's files always have a row by the time we look.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, delete, select

from tpa_core.store.blobs import BLOB_SUFFIX, QUARANTINE_DIR, TMP_SUFFIX
from tpa_core.store.tables import PENDING, READY, Entry

log = logging.getLogger(__name__)

# A pending row or temp file of a writer on another host is presumed dead after this long (no way to ask).
FOREIGN_STALE_SECONDS = 3600.0


def _start_ticks(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, from /proc), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces; fields resume after ')'
    if fields[0] in ("Z", "X"):  # a zombie writes nothing more
        return None
    return fields[19]  # field 22 of proc(5), counted from field 3


def writer_id() -> str:
    """This process as a writer: host, pid and start time (so a recycled pid is not taken for the writer)."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid) or '?'}"


def writer_alive(writer: str | None, since: float, now: float | None = None) -> bool:
    """Whether the writer that claimed a pending row at time `since` may still be writing."""
    if not writer:
        return False
    parts = writer.rsplit(":", 2)
    if len(parts) != 3:
        return False
    host, pid_s, ticks = parts
    if host != socket.gethostname():
        return ((now or time.time()) - since) < FOREIGN_STALE_SECONDS
    try:
        pid = int(pid_s)
    except ValueError:
        return False
    current = _start_ticks(pid)
    if current is None:
        # no /proc entry: gone, unless there is no /proc at all (macOS), where signal 0 tells
        return not Path("/proc").is_dir() and process_exists(pid)
    return ticks in ("?", current)


def process_exists(pid: int) -> bool:
    """Whether a process with this id exists (signal 0; one of another user's counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class ReconcileReport:
    stale_pending: int = 0
    temp_files: int = 0
    orphan_files: int = 0
    missing_files: int = 0
    wrong_size: int = 0

    def total(self) -> int:
        return self.stale_pending + self.temp_files + self.orphan_files + self.missing_files + self.wrong_size


def _list_files(blobs_dir: Path) -> tuple[list[Path], list[Path]]:
    """(blob files, temp files) under the blobs folder, the quarantine folder left out."""
    blobs: list[Path] = []
    temps: list[Path] = []
    if not blobs_dir.is_dir():
        return blobs, temps
    for root, dirs, files in os.walk(blobs_dir):
        if Path(root) == blobs_dir and QUARANTINE_DIR in dirs:
            dirs.remove(QUARANTINE_DIR)
        for name in files:
            if name.endswith(BLOB_SUFFIX):
                blobs.append(Path(root) / name)
            elif name.endswith(TMP_SUFFIX):
                temps.append(Path(root) / name)
    return blobs, temps


def drop_stale_pending(engine: Engine, blobs_dir: Path, row_key: str, writer: str | None, path: str) -> bool:
    """Remove one pending row of a dead writer and whatever it left at its final path. The file goes first:
    while the row exists nobody else may write that path."""
    (blobs_dir / path).unlink(missing_ok=True)
    with engine.begin() as conn:
        result = conn.execute(
            delete(Entry).where(Entry.key == row_key, Entry.state == PENDING, Entry.writer == writer)
        )
    return result.rowcount == 1


def reconcile(engine: Engine, blobs_dir: Path, quarantine) -> ReconcileReport:  # callback
    """Run every repair listed in the module docstring; `quarantine(key, reason)` handles wrong-size files."""
    report = ReconcileReport()
    now = time.time()
    blob_files, temp_files = _list_files(blobs_dir)  # files first, rows second (see the module docstring)
    with engine.connect() as conn:
        rows = conn.execute(
            select(Entry.key, Entry.state, Entry.writer, Entry.created, Entry.path, Entry.nbytes)
        ).all()

    live_pending: dict[str, str | None] = {}
    known_paths: set[str] = set()
    for key, state, writer, created, path, nbytes in rows:
        if state == PENDING:
            if writer_alive(writer, created, now):
                live_pending[key] = writer
                known_paths.add(path)
            elif drop_stale_pending(engine, blobs_dir, key, writer, path):
                report.stale_pending += 1
                log.info("store: dropped a pending page of a writer that is gone (%s)", key[:16])
            continue
        if state != READY:
            continue
        known_paths.add(path)
        try:
            size = (blobs_dir / path).stat().st_size
        except FileNotFoundError:
            with engine.begin() as wconn:
                result = wconn.execute(delete(Entry).where(Entry.key == key, Entry.state == READY))
            report.missing_files += result.rowcount
            continue
        if size != nbytes:
            quarantine(key, f"file has {size} bytes, the index says {nbytes}")
            report.wrong_size += 1

    for tmp in temp_files:
        key, _, rest = tmp.name.partition(".")
        pid = rest.split(".", 1)[0]
        writer = live_pending.get(key)
        parts = writer.rsplit(":", 2) if writer else []
        if len(parts) == 3 and parts[1] == pid:
            continue  # the live writer's own temp file
        try:
            old = now - tmp.stat().st_mtime
        except FileNotFoundError:
            continue
        foreign = len(parts) == 3 and parts[0] != socket.gethostname()
        if foreign and old < FOREIGN_STALE_SECONDS:
            continue
        tmp.unlink(missing_ok=True)
        report.temp_files += 1

    for blob in blob_files:
        rel = blob.relative_to(blobs_dir).as_posix()
        if rel not in known_paths:
            # A file that appeared after our row snapshot belongs to a row we did not see: check again.
            with engine.connect() as conn:
                again = conn.execute(select(Entry.key).where(Entry.path == rel)).first()
            if again is None:
                blob.unlink(missing_ok=True)
                report.orphan_files += 1
    if report.total():
        log.info("store: reconciliation repaired %s", report)
    return report
