"""Eviction under a byte budget: LRU, leaves before parents, pins spared, warm pages kept from one-off floods,
admission control."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from store_workload import PAGE, namespace, prefill_paged, prompt

from tpa_core.store import FactorStore
from tpa_core.store.errors import StoreError
from tpa_core.store.eviction import Budget
from tpa_core.store.tables import READY, Entry


def _keys_present(store) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.execute(select(Entry.key).where(Entry.state == READY)).scalars())


def _page_bytes(engine, blobs_dir, model) -> int:
    """The size of one full page's blob (pages differ by a few header bytes; take the largest)."""
    probe = FactorStore.open(engine, blobs_dir, 10**9)
    ns = namespace(probe)
    ids = prompt(99, 2 * PAGE)
    probe.save(ns, ids, prefill_paged(model, ids)[0])
    with engine.connect() as conn:
        size = max(conn.execute(select(Entry.nbytes)).scalars())
    probe.clear(include_pinned=True)
    return size


def _save(store, ns, model, ids) -> list[str]:
    store.save(ns, ids, prefill_paged(model, ids)[0])
    return store.prefix_keys(ns, ids)


@pytest.fixture
def page_bytes(engine, blobs_dir, tiny_model) -> int:
    return _page_bytes(engine, blobs_dir, tiny_model)


def test_leaves_go_before_parents_and_reused_pages_outlive_unused_ones(engine, blobs_dir, tiny_model, page_bytes):
    S = page_bytes
    store = FactorStore.open(engine, blobs_dir, 10 * S, high_watermark=0.85, low_watermark=0.72)
    ns = namespace(store)
    x = _save(store, ns, tiny_model, prompt(50, 3 * PAGE))
    y = _save(store, ns, tiny_model, prompt(51, 3 * PAGE))
    assert store.restore(ns, prompt(50, 3 * PAGE), tiny_model.new_cache(), limit=3 * PAGE) == 3 * PAGE
    z = _save(store, ns, tiny_model, prompt(52, 3 * PAGE))  # 9 pages > 8.5: evict down to 7.2 pages
    # Y is the oldest unused chain; its end goes first (plain LRU would have taken y[0], stranding y[1:]).
    assert _keys_present(store) == {*x, *z, y[0]}
    assert store.stats().evicted == 2
    # X, older than Y but reused, is still whole.
    assert store.restore(ns, prompt(50, 3 * PAGE), tiny_model.new_cache(), limit=3 * PAGE) == 3 * PAGE


def test_pinned_entries_are_spared(engine, blobs_dir, tiny_model, page_bytes):
    S = page_bytes
    store = FactorStore.open(engine, blobs_dir, 6 * S, high_watermark=0.9, low_watermark=0.5)
    ns = namespace(store)
    doc = prompt(60, 2 * PAGE)
    store.pin(store.prefix_keys(ns, doc), "document:60")  # pinned before it exists: applied when written
    pinned = _save(store, ns, tiny_model, doc)
    for seed in range(61, 66):
        _save(store, ns, tiny_model, prompt(seed, 2 * PAGE))
    present = _keys_present(store)
    assert set(pinned) <= present and len(present) <= 5  # the oldest pages are the pinned ones, yet they stay
    stats = store.stats()
    assert stats.evicted >= 6 and stats.pinned_bytes > S

    assert store.unpin("document:60") == 2
    store.evict(force=True)
    assert not set(pinned) & _keys_present(store)  # unpinned, oldest, unused: gone first


def test_a_flood_of_one_off_prompts_does_not_flush_a_warm_document(engine, blobs_dir, tiny_model, page_bytes):
    S = page_bytes
    store = FactorStore.open(engine, blobs_dir, 8 * S)
    ns = namespace(store)
    doc = prompt(70, 2 * PAGE + 10)
    warm = _save(store, ns, tiny_model, doc)
    assert store.restore(ns, doc, tiny_model.new_cache()) == len(doc) - 1  # reused once: protected
    for seed in range(100, 120):  # one-off questions, each a page of its own
        _save(store, ns, tiny_model, prompt(seed, PAGE + 5))
    assert set(warm) <= _keys_present(store)
    assert store.restore(ns, doc, tiny_model.new_cache()) == len(doc) - 1
    stats = store.stats()
    assert stats.evicted >= 20 and stats.bytes <= 8 * S


def test_protected_pages_over_their_share_are_evicted_first(engine, blobs_dir, tiny_model, page_bytes):
    S = page_bytes
    store = FactorStore.open(engine, blobs_dir, 10 * S, high_watermark=0.85, low_watermark=0.75,
                             protected_share=0.3)
    ns = namespace(store)
    old, new = prompt(80, 2 * PAGE), prompt(81, 2 * PAGE)
    for ids in (old, new):  # 4 reused pages: over a protected share of 3 pages
        _save(store, ns, tiny_model, ids)
        store.restore(ns, ids, tiny_model.new_cache(), limit=2 * PAGE)
    unused = [_save(store, ns, tiny_model, prompt(seed, 2 * PAGE)) for seed in (82, 83, 84)]
    present = _keys_present(store)
    old_keys = store.prefix_keys(ns, old)
    assert old_keys[1] not in present  # the least recently used protected leaf went first
    assert set(store.prefix_keys(ns, new)) <= present and set(unused[-1]) <= present


def test_admission_refuses_pages_that_could_only_evict_pinned_ones(engine, blobs_dir, tiny_model, page_bytes):
    S = page_bytes
    store = FactorStore.open(engine, blobs_dir, 4 * S)
    ns = namespace(store)
    doc = prompt(90, 3 * PAGE)
    store.pin(store.prefix_keys(ns, doc), "document:90")
    pinned = _save(store, ns, tiny_model, doc)
    assert store.save(ns, prompt(91, 2 * PAGE), prefill_paged(tiny_model, prompt(91, 2 * PAGE))[0]) == 0
    stats = store.stats()
    assert stats.rejected == 1 and stats.evicted == 0 and _keys_present(store) == set(pinned)
    assert store.session.rejected == 1


def test_bad_budgets_are_refused():
    for kwargs in ({"budget_bytes": 0}, {"budget_bytes": 10, "low_watermark": 0.95},
                   {"budget_bytes": 10, "protected_share": 0}):
        with pytest.raises(StoreError):
            Budget(**kwargs)
