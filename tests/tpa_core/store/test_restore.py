"""Restore straight into the live cache: every kind of bad page is quarantined and recomputed with the same
answer, a page gone since the lookup is a plain miss, nothing unverified stays in the cache, old formats are
dropped. On SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import threading

import pytest
import torch
from sqlalchemy import delete, func, select, update
from store_workload import PAGE, namespace, open_store, prefill_paged, prompt

from tpa_core.store import FactorStore, blobs
from tpa_core.store.tables import Entry, Link, Namespace, Quarantined


@pytest.fixture(params=[1, 3], ids=["one-reader", "three-readers"])
def store(request, engine, blobs_dir) -> FactorStore:
    return FactorStore.open(engine, blobs_dir, 10**9, io_threads=request.param)


def _quarantined(store) -> list[str]:
    with store.engine.connect() as conn:
        return list(conn.execute(select(Quarantined.reason)).scalars())


def _exports_equal(a, b, n: int, seq_b: int = 0) -> bool:
    ea, eb = a.export(0, 0, n), b.export(seq_b, 0, n)
    return sorted(ea) == sorted(eb) and all(torch.equal(ea[k], eb[k]) for k in ea)


def _flip(path, data):
    raw = bytearray(data)
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate(path, data):
    path.write_bytes(data[:len(data) - 1000])


def _lying_shape(path, data, store=None, ref=None):
    """A well-formed page whose header gives one tensor another shape of the same size, recorded in the index
    as if a writer had written it (size and checksum match): only the shape check can catch it."""
    header, start = blobs.read_header(data)
    name = sorted(k for k in header if k != "__metadata__")[0]
    shape = header[name]["shape"]
    header[name]["shape"] = [shape[0], *reversed(shape[1:])] if shape[1:] != shape[:0:-1] else [shape[0] // 2,
                                                                                                 shape[1] * 2,
                                                                                                 *shape[2:]]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    bad = struct.pack("<Q", len(text)) + text + data[start:]
    path.write_bytes(bad)
    with store.engine.begin() as conn:
        conn.execute(update(Entry).where(Entry.key == ref.key)
                     .values(nbytes=len(bad), checksum=blobs.checksum_of(bad)))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "swapped", "lying shape", "fifo"])
def test_a_bad_page_is_quarantined_and_the_answer_recomputed(store, tiny_model, damage, caplog):
    ns = namespace(store)
    ids = prompt(40, 1100)
    cache, fresh_logits = prefill_paged(tiny_model, ids)
    assert store.save(ns, ids, cache) == 5
    refs = store.lookup(ns, ids)
    bad = refs[2]  # [512, 768): the first two pages stay good
    path = store.blobs_dir / bad.path
    data = path.read_bytes()
    if damage == "flipped byte":
        _flip(path, data)
    elif damage == "truncated":
        _truncate(path, data)
    elif damage == "swapped":  # another valid page of the same namespace, of the same size
        assert refs[3].nbytes == bad.nbytes
        shutil.copyfile(store.blobs_dir / refs[3].path, path)
    elif damage == "lying shape":
        _lying_shape(path, data, store, bad)
    else:
        path.unlink()
        os.mkfifo(path)

    warm = tiny_model.new_cache()
    done: list[int] = []
    with caplog.at_level(logging.WARNING, logger="tpa_core.store"):
        worker = threading.Thread(target=lambda: done.append(store.restore(ns, ids, warm)), daemon=True)
        worker.start()
        worker.join(timeout=30)  # a FIFO must never block the reader
    assert not worker.is_alive(), "restore blocked on a page that is not a regular file"
    assert done == [2 * PAGE]  # stopped before the bad page: a miss, never loaded
    assert warm.length(0) == 2 * PAGE and _exports_equal(cache, warm, 2 * PAGE)
    assert "quarantined" in caplog.text and len(_quarantined(store)) == 1
    assert not os.path.lexists(path)
    for storage in warm.storage.values():  # what was read of the bad page (and after it) is zeros again
        assert not storage[:, 0, 2 * PAGE:].any()

    _, warm_logits = prefill_paged(tiny_model, ids, warm)  # the engine recomputes the rest
    assert torch.equal(warm_logits, fresh_logits)
    assert store.save(ns, ids, warm) == 1  # the recomputed page is written again
    again = tiny_model.new_cache()
    assert store.restore(ns, ids, again) == len(ids) - 1 and _exports_equal(cache, again, len(ids) - 1)
    assert store.verify().corrupt == 0


def test_the_reasons_name_the_damage(store, tiny_model):
    ns = namespace(store)
    ids = prompt(41, 800)
    store.save(ns, ids, prefill_paged(tiny_model, ids)[0])
    refs = store.lookup(ns, ids)
    _flip(store.blobs_dir / refs[1].path, (store.blobs_dir / refs[1].path).read_bytes())
    assert store.restore(ns, ids, tiny_model.new_cache()) == PAGE
    _truncate(store.blobs_dir / refs[0].path, (store.blobs_dir / refs[0].path).read_bytes())
    assert store.restore(ns, ids, tiny_model.new_cache()) == 0
    reasons = _quarantined(store)
    assert "checksum mismatch" in reasons[0] and "the index says" in reasons[1], reasons


def test_a_page_evicted_between_lookup_and_read_is_a_plain_miss(store, tiny_model, caplog, monkeypatch):
    ns = namespace(store)
    ids = prompt(42, 1000)
    cache, _ = prefill_paged(tiny_model, ids)
    store.save(ns, ids, cache)
    lookup = store.lookup

    def lookup_then_evict(*args, **kw):
        chain = lookup(*args, **kw)
        gone = chain[1]  # another process evicts page 2 right after our lookup: row and file
        with store.engine.begin() as conn:
            conn.execute(delete(Entry).where(Entry.key == gone.key))
        (store.blobs_dir / gone.path).unlink()
        return chain

    monkeypatch.setattr(store, "lookup", lookup_then_evict)
    warm = tiny_model.new_cache()
    with caplog.at_level(logging.WARNING, logger="tpa_core.store"):
        assert store.restore(ns, ids, warm) == PAGE
    assert not caplog.records and not _quarantined(store) and store.session.corrupt == 0
    assert _exports_equal(cache, warm, PAGE)


def _random_bits(cache, n: int, seed: int) -> None:
    """Fill tokens [0, n) of sequence 0 with random bit patterns (NaNs, infinities and subnormals included)."""
    g = torch.Generator().manual_seed(seed)
    bits = {2: torch.int16, 4: torch.int32}[cache.storage["bk"].element_size()]
    cache.reserve(n)
    for i in range(cache.config.n_layers):
        factors = {name: torch.randint(-2**15, 2**15, (1, n, *shape), generator=g).to(bits).view(cache.dtype)
                   for name, shape in cache.shapes.items()}  # [1, n, ...]
        cache.write(i, factors, starts=[0], rows=slice(0, 1))
    cache.advance(n, rows=slice(0, 1))


def _bits(cache, seq: int, n: int) -> dict[str, torch.Tensor]:
    bits = {2: torch.int16, 4: torch.int32}[cache.storage["bk"].element_size()]
    return {k: v.view(bits) for k, v in cache.export(seq, 0, n).items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_restored_cache_equals_the_saved_one_bit_for_bit(store, tiny_config, dtype):
    from tpa_core.cache import FactorCache

    ns = store.namespace_for("tiny-bit-exact", tiny_config, dtype)
    ids = prompt(43, 1300)
    cache = FactorCache(tiny_config, dtype=dtype, capacity=64)
    _random_bits(cache, len(ids), seed=43)
    store.save(ns, ids, cache)
    saved = _bits(cache, 0, len(ids))
    for seq, batch in ((0, 1), (1, 3)):
        warm = FactorCache(tiny_config, batch_size=batch, dtype=dtype, capacity=16)  # grows while restoring
        assert store.restore(ns, ids, warm, seq=seq, limit=len(ids)) == len(ids)
        back = _bits(warm, seq, len(ids))
        assert sorted(back) == sorted(saved) and all(torch.equal(back[k], saved[k]) for k in saved)
        assert all(warm.length(s) == 0 for s in range(batch) if s != seq)


def test_a_cache_of_another_shape_is_refused_before_anything_is_read(store, tiny_model):
    from store_workload import make_config

    from tpa_core.cache import FactorCache
    from tpa_core.store import StoreError

    ns = namespace(store)
    ids = prompt(44, 600)
    store.save(ns, ids, prefill_paged(tiny_model, ids)[0])
    other = make_config()
    other.n_layers = 3
    with pytest.raises(StoreError, match="do not fit"):
        store.restore(ns, ids, FactorCache(other))


def test_pages_of_an_earlier_format_are_dropped_at_open_with_a_log_line(db_url, blobs_dir, tiny_model, caplog):
    store = open_store(db_url, blobs_dir)
    ns = namespace(store)
    ids = prompt(45, 600)
    store.save(ns, ids, prefill_paged(tiny_model, ids)[0])
    store.pin(store.prefix_keys(ns, ids), "session:1")
    paths = [store.blobs_dir / r.path for r in store.lookup(ns, ids)]
    with store.engine.begin() as conn:  # what an earlier version left: its namespace says format 1
        conn.execute(update(Namespace).where(Namespace.key == ns).values(format_version=1))
    store.engine.dispose()

    with caplog.at_level(logging.WARNING, logger="tpa_core.store"):
        reopened = open_store(db_url, blobs_dir)
    assert "dropped 3 cached pages" in caplog.text and "earlier blob format" in caplog.text
    assert not any(p.exists() for p in paths)
    with reopened.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Entry)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(Link)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(Namespace)).scalar_one() == 0
    ns2 = namespace(reopened)
    assert reopened.restore(ns2, ids, tiny_model.new_cache()) == 0
    assert reopened.save(ns2, ids, prefill_paged(tiny_model, ids)[0]) == 3
    assert reopened.restore(ns2, ids, tiny_model.new_cache()) == len(ids) - 1


def test_the_staging_path_of_a_device_cache_gives_the_same_pages(store, tiny_model, monkeypatch):
    """A cache off the CPU reads each page into a host staging page and copies it once verified; forced here on
    a CPU cache, with a bad page among good ones."""
    from tpa_core.store import transfer

    ns = namespace(store)
    ids = prompt(47, 1000)
    cache, _ = prefill_paged(tiny_model, ids)
    store.save(ns, ids, cache)
    monkeypatch.setattr(transfer, "reads_in_place", lambda cache: False)
    warm = tiny_model.new_cache()
    assert store.restore(ns, ids, warm) == len(ids) - 1 and _exports_equal(cache, warm, len(ids) - 1)
    bad = store.lookup(ns, ids)[2]
    _flip(store.blobs_dir / bad.path, (store.blobs_dir / bad.path).read_bytes())
    warm = tiny_model.new_cache()
    assert store.restore(ns, ids, warm) == 2 * PAGE and _exports_equal(cache, warm, 2 * PAGE)
    assert len(_quarantined(store)) == 1


def test_a_failed_write_gives_its_claim_back_and_keeps_the_other_pages(store, tiny_model, monkeypatch):
    ns = namespace(store)
    ids = prompt(48, 1000)
    cache, _ = prefill_paged(tiny_model, ids)
    write_page = blobs.write_page

    def disk_full_on_the_second_page(path, tensors, meta):
        if meta["start"] == PAGE and meta["kind"] == "page":
            raise OSError(28, "No space left on device")
        return write_page(path, tensors, meta)

    monkeypatch.setattr(blobs, "write_page", disk_full_on_the_second_page)
    with pytest.raises(OSError, match="No space left"):
        store.save(ns, ids, cache)
    with store.engine.connect() as conn:
        rows = dict(conn.execute(select(Entry.start, Entry.state).where(Entry.kind == "page")).all())
        paths = set(conn.execute(select(Entry.path)).scalars())
    assert rows == {0: "ready", 2 * PAGE: "ready"}  # the others were written; no pending row is left behind
    on_disk = {p.relative_to(store.blobs_dir).as_posix() for p in store.blobs_dir.rglob("*") if p.is_file()}
    assert on_disk == paths
    monkeypatch.undo()
    assert store.save(ns, ids, cache) == 1
    warm = tiny_model.new_cache()
    assert store.restore(ns, ids, warm) == len(ids) - 1 and _exports_equal(cache, warm, len(ids) - 1)
