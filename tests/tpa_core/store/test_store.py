"""FactorStore with a real FactorCache and a tiny random TPAModel, on SQLite and on PostgreSQL."""

from __future__ import annotations

import logging

import pytest
import torch
from sqlalchemy import func, select
from store_workload import PAGE, make_config, namespace, prefill_paged, prompt

from tpa_core.store import FactorStore, StoreError
from tpa_core.store.keys import namespace_key
from tpa_core.store.tables import Entry, Quarantined


@pytest.fixture
def store(engine, blobs_dir) -> FactorStore:
    return FactorStore.open(engine, blobs_dir, 10**9)


@pytest.fixture
def ns(store) -> str:
    return namespace(store)


def _exports_equal(a, b, n: int) -> bool:
    ea, eb = a.export(0, 0, n), b.export(0, 0, n)
    return sorted(ea) == sorted(eb) and all(torch.equal(ea[k], eb[k]) for k in ea)


def _count(store, *where) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(Entry).where(*where)).scalar_one()


def test_round_trip_is_exact(store, ns, tiny_model):
    ids = prompt(1, 700)
    cache, _ = prefill_paged(tiny_model, ids)
    assert store.save(ns, ids, cache) == 3  # two full pages and a tail of 188 tokens
    assert store.save(ns, ids, cache) == 0  # content addressed: nothing written twice

    restored = tiny_model.new_cache()
    assert store.restore(ns, ids, restored) == 699  # the last token is left to prefill
    assert restored.length(0) == 699 and _exports_equal(cache, restored, 699)

    full = tiny_model.new_cache()
    assert store.restore(ns, ids, full, limit=700) == 700 and _exports_equal(cache, full, 700)
    part = tiny_model.new_cache()
    assert store.restore(ns, ids, part, limit=300) == 300 and _exports_equal(cache, part, 300)
    assert store.restore(ns, prompt(3, 400), part) == 0 and part.length(0) == 0  # a miss leaves it empty


def test_restore_into_a_batch_row(store, ns, tiny_model, tiny_config):
    from tpa_core.cache import FactorCache

    ids = prompt(2, 600)
    cache, _ = prefill_paged(tiny_model, ids)
    store.save(ns, ids, cache)
    batch = FactorCache(tiny_config, batch_size=3, dtype=torch.float32)
    assert store.restore(ns, ids, batch, seq=2) == 599
    assert batch.length(2) == 599 and batch.length(0) == 0
    a, b = cache.export(0, 0, 599), batch.export(2, 0, 599)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reused_prefix_gives_bit_identical_logits(store, ns, tiny_model):
    doc = 600
    first = prompt(10, doc + 40, shared=doc)
    cache, _ = prefill_paged(tiny_model, first)
    store.save(ns, first, cache)

    # Another question on the same document: the two full pages of the document are reused.
    second = prompt(11, doc + 35, shared=doc)
    warm = tiny_model.new_cache()
    reused = store.restore(ns, second, warm)
    assert reused == 2 * PAGE
    _, warm_logits = prefill_paged(tiny_model, second, warm)
    _, cold_logits = prefill_paged(tiny_model, second)
    assert torch.equal(warm_logits, cold_logits)

    # A follow-up turn extends the first prompt: its tail page is reused too. The fresh prefill is cut at the
    # same positions (the tail was computed as the chunk [512, 640) of the first prompt).
    third = first + prompt(12, 50)
    warm = tiny_model.new_cache()
    assert store.restore(ns, third, warm) == len(first)
    _, warm_logits = prefill_paged(tiny_model, third, warm)
    cold, _ = prefill_paged(tiny_model, first)
    _, cold_logits = prefill_paged(tiny_model, third, cold)
    assert torch.equal(warm_logits, cold_logits)


def test_a_boundary_tail_serves_the_next_question_on_the_same_context(store, ns, tiny_model):
    doc = prompt(13, 600)
    first = doc + prompt(14, 30)
    cache, _ = prefill_paged(tiny_model, first, cuts=(len(doc),))  # the app cuts its prefill there too
    assert store.save(ns, first, cache, boundaries=[len(doc)]) == 4  # 2 pages, the anchored tail, the tail

    second = doc + prompt(15, 25)
    warm = tiny_model.new_cache()
    assert store.restore(ns, second, warm) == len(doc)
    _, warm_logits = prefill_paged(tiny_model, second, warm)
    _, cold_logits = prefill_paged(tiny_model, second, cuts=(len(doc),))
    assert torch.equal(warm_logits, cold_logits)
    store.save(ns, second, warm, boundaries=[len(doc)])
    assert _count(store, Entry.kind == "tail") == 3  # the anchored tail is never replaced by a longer one
    assert _count(store, Entry.kind == "tail", Entry.anchored.is_(True)) == 1


def test_tail_is_replaced_when_it_grows_and_when_it_fills(store, ns, tiny_model):
    base = prompt(20, 900)
    for n in (300, 400):
        cache, _ = prefill_paged(tiny_model, base[:n])
        store.save(ns, base[:n], cache)
        assert _count(store, Entry.kind == "tail") == 1  # the 144-token tail replaced the 44-token one
    branch = base[:350] + prompt(21, 30)  # a different continuation: a second tail beside the first
    cache, _ = prefill_paged(tiny_model, branch)
    store.save(ns, branch, cache)
    assert _count(store, Entry.kind == "tail") == 2
    cache, _ = prefill_paged(tiny_model, base[:600])
    store.pin(store.prefix_keys(ns, base[:400]), "session:1")  # pins the 400-token tail...
    store.save(ns, base[:600], cache)
    # ...which the full second page replaces (its pin moves with it); the branch tail stays.
    assert _count(store, Entry.kind == "page") == 2 and _count(store, Entry.kind == "tail") == 2
    assert store.owners(store.prefix_keys(ns, base[:600])[1]) == ["session:1"]
    warm = tiny_model.new_cache()
    assert store.restore(ns, base[:600], warm, limit=600) == 600 and _exports_equal(cache, warm, 600)
    warm = tiny_model.new_cache()
    assert store.restore(ns, branch, warm) == len(branch) - 1


def test_namespaces_are_separate(store, ns, tiny_model, tiny_config):
    ids = prompt(30, 520)
    cache, _ = prefill_paged(tiny_model, ids)
    store.save(ns, ids, cache)
    assert store.restore(ns, ids, tiny_model.new_cache()) == 519

    other_rope = make_config()
    other_rope.rope_theta = 500000.0
    for other in (namespace(store, other_rope), namespace(store, fingerprint="another-model"),
                  store.namespace_for("tiny-random-1234", make_config(), torch.bfloat16)):
        assert other != ns
        assert store.restore(other, ids, tiny_model.new_cache()) == 0
    assert store.session.misses >= 6


def test_namespace_for_a_loaded_model_and_bad_calls(store, tiny_config, tiny_model, tmp_path):
    from tpa_core.loading import LoadedModel

    loaded = LoadedModel(model=tiny_model, tokenizer=None, config=tiny_config, fingerprint="f" * 64,
                         chat_template=None, name="tiny", source=tmp_path, cache_dir=tmp_path)
    assert store.namespace_for(loaded) == store.namespace_for("f" * 64, tiny_config, torch.float32)
    tiny_model.cache_dtype = torch.float16  # a narrower cache (resident GGUF weights): its own pages
    try:
        assert store.namespace_for(loaded) == store.namespace_for("f" * 64, tiny_config, torch.float16)
    finally:
        tiny_model.cache_dtype = None
    # 16-bit factors computed over a float32 residual (tpa_core.model) never meet an earlier build's pages;
    # float32 namespaces keep their earlier keys
    cfg = tiny_config.to_dict()
    rope = {k: v for k, v in sorted(cfg.items())
            if k.startswith("rope") or k in ("head_dim", "max_position_embeddings")}
    for dtype, same_as_before in ((torch.float32, True), (torch.bfloat16, False), (torch.float16, False)):
        earlier = namespace_key("f" * 64, str(dtype).removeprefix("torch."), rope, config=cfg)
        assert (store.namespace_for("f" * 64, tiny_config, dtype) == earlier) == same_as_before, dtype
    with pytest.raises(StoreError, match="fingerprint"):
        store.namespace_for(object(), tiny_config, torch.float32)
    with pytest.raises(StoreError, match="dtype"):
        store.namespace_for("fp", tiny_config)
    with pytest.raises(StoreError, match="unknown cache namespace"):
        store.restore("0" * 64, prompt(1, 300), tiny_model.new_cache())
    with pytest.raises(StoreError, match="budget"):
        FactorStore.open(store.engine, store.blobs_dir, 0)


def test_a_cache_of_another_model_does_not_fit_the_namespace(store, ns, tiny_model):
    from tpa_core.model import TPAModel

    first = prompt(32, 300)
    store.save(ns, first, prefill_paged(tiny_model, first)[0])  # fixes the namespace's layout
    other = make_config()
    other.n_layers = 3
    torch.manual_seed(0)
    ids = prompt(31, 300)
    cache, _ = prefill_paged(TPAModel(other).eval(), ids)
    with pytest.raises(StoreError, match="do not fit"):
        store.save(ns, ids, cache)


def test_flipped_byte_is_quarantined_and_the_answer_recomputed(store, ns, tiny_model, caplog):
    ids = prompt(40, 800)
    cache, fresh_logits = prefill_paged(tiny_model, ids)
    store.save(ns, ids, cache)
    second = store.lookup(ns, ids)[1]
    path = store.blobs_dir / second.path
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))

    warm = tiny_model.new_cache()
    with caplog.at_level(logging.WARNING, logger="tpa_core.store"):
        reused = store.restore(ns, ids, warm)
    assert reused == PAGE  # stopped before the bad page: a miss, never loaded
    assert "quarantined" in caplog.text and "checksum" in caplog.text
    assert not path.exists() and _count(store, Entry.key == second.key) == 0
    with store.engine.connect() as conn:
        (qpath,) = conn.execute(select(Quarantined.path).where(Quarantined.key == second.key)).one()
    assert (store.blobs_dir / qpath).exists()

    _, warm_logits = prefill_paged(tiny_model, ids, warm)  # the engine recomputes the rest
    assert torch.equal(warm_logits, fresh_logits)
    assert store.save(ns, ids, warm) == 1  # the recomputed page is written again
    again = tiny_model.new_cache()
    assert store.restore(ns, ids, again) == len(ids) - 1 and _exports_equal(cache, again, len(ids) - 1)
    assert store.verify().to_dict() == {"entries": 4, "ok": 4, "corrupt": 0, "quarantined": 1,
                                        "bytes": store.stats().bytes}


def test_verify_finds_and_quarantines_damage(store, ns, tiny_model):
    ids = prompt(41, 600)
    cache, _ = prefill_paged(tiny_model, ids)
    store.save(ns, ids, cache)
    refs = store.lookup(ns, ids)
    (store.blobs_dir / refs[0].path).write_bytes(b"not a safetensors file")
    report = store.verify()
    assert (report.entries, report.ok, report.corrupt, report.quarantined) == (3, 2, 1, 1)
    assert report.bytes == refs[1].nbytes + refs[2].nbytes
    assert store.restore(ns, ids, tiny_model.new_cache()) == 0
