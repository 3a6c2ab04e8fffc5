"""Reconciliation at open: every kind of crash debris is cleared, a live writer's work is left alone."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time

from sqlalchemy import insert, select
from store_workload import namespace, open_store, prefill_paged, prompt

from tpa_core.store.blobs import blob_relpath
from tpa_core.store.reconcile import writer_alive, writer_id
from tpa_core.store.tables import PENDING, READY, Entry


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _pending_row(ns: str, key: str, writer: str) -> dict:
    now = time.time()
    return {"key": key, "namespace": ns, "parent": None, "kind": "tail", "start": 0, "n_tokens": 3, "nbytes": 10,
            "path": blob_relpath(ns, key), "checksum": "0" * 64, "state": PENDING, "writer": writer,
            "created": now, "last_access": now, "hits": 0, "pinned": False}


def test_writer_liveness():
    me = writer_id()
    assert writer_alive(me, time.time())
    host, pid, ticks = me.rsplit(":", 2)
    assert not writer_alive(f"{host}:{pid}:{int(ticks) + 1}", time.time())  # a recycled pid is not us
    assert not writer_alive(f"{host}:{_dead_pid()}:1", time.time())
    assert writer_alive("other-host:1:1", time.time())  # another machine: trusted for an hour...
    assert not writer_alive("other-host:1:1", time.time() - 7200)  # ...then presumed dead
    assert not writer_alive(None, time.time()) and not writer_alive("garbage", time.time())


def test_open_clears_crash_debris_and_keeps_good_pages(db_url, blobs_dir, tiny_model):
    store = open_store(db_url, blobs_dir)
    ns = namespace(store)
    ids = prompt(5, 600)
    store.save(ns, ids, prefill_paged(tiny_model, ids)[0])
    refs = store.lookup(ns, ids)
    host = socket.gethostname()
    dead = f"{host}:{_dead_pid()}:1"
    stale_key, live_key = hashlib.sha256(b"stale").hexdigest(), hashlib.sha256(b"live").hexdigest()
    with store.engine.begin() as conn:
        conn.execute(insert(Entry).values(**_pending_row(ns, stale_key, dead)))
        conn.execute(insert(Entry).values(**_pending_row(ns, live_key, writer_id())))
    stale_file = blobs_dir / blob_relpath(ns, stale_key)  # renamed into place, never marked ready
    stale_file.parent.mkdir(parents=True, exist_ok=True)
    stale_file.write_bytes(b"complete or not, nobody vouched for it")
    dead_tmp = stale_file.with_name(f"{stale_key}.{dead.split(':')[1]}.abcd1234.tmp")
    dead_tmp.write_bytes(b"half a page")
    live_tmp = stale_file.with_name(f"{live_key}.{os.getpid()}.abcd1234.tmp")
    live_tmp.write_bytes(b"being written right now")
    orphan = blobs_dir / blob_relpath(ns, hashlib.sha256(b"orphan").hexdigest())
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"a file whose row was deleted before the crash")
    (blobs_dir / refs[2].path).unlink()  # a ready row whose file vanished

    reopened = open_store(db_url, blobs_dir)
    with reopened.engine.connect() as conn:
        rows = dict(conn.execute(select(Entry.key, Entry.state)).all())
    assert rows == {refs[0].key: READY, refs[1].key: READY, live_key: PENDING}
    assert not stale_file.exists() and not dead_tmp.exists() and not orphan.exists()
    assert live_tmp.exists()  # a live writer's temp file is its own business
    assert reopened.restore(ns, ids, tiny_model.new_cache()) == 512  # the tail is gone, the pages are fine
    assert reopened.verify().corrupt == 0


def test_a_file_of_the_wrong_size_is_quarantined_at_open(db_url, blobs_dir, tiny_model):
    store = open_store(db_url, blobs_dir)
    ns = namespace(store)
    ids = prompt(6, 300)
    store.save(ns, ids, prefill_paged(tiny_model, ids)[0])
    page = store.lookup(ns, ids)[0]
    with open(blobs_dir / page.path, "ab") as f:
        f.write(b"trailing garbage")
    reopened = open_store(db_url, blobs_dir)
    assert reopened.stats().quarantined == 1
    assert reopened.restore(ns, ids, tiny_model.new_cache()) == 0
