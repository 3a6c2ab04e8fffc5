"""Chunk reuse in the ask flow, on the tiny model: assembly, its metrics, and what it must never do."""

from __future__ import annotations

import json

import torch
from sqlalchemy import select

from app.chunk_reuse import reuse_pays_on
from app.service import AskOptions
from tpa_core.store.chunks import CHUNK_KIND
from tpa_core.store.tables import Entry, Quarantined

QUESTION = "How does the cache store key its entries?"
OTHER = "What does tensor product attention factorize?"
ON = AskOptions(chunk_reuse=True)
OFF = AskOptions(chunk_reuse=False)


def _chunk_entries(service) -> list:
    with service.store.engine.connect() as conn:
        return conn.execute(select(Entry.key, Entry.path).where(Entry.kind == CHUNK_KIND)).all()


def test_second_question_assembles_from_chunk_caches(service, make_service):
    first = service.ask(QUESTION, "docs", options=ON)
    m = first.metrics
    assert m["chunk_tokens"] > 0 and m["recomputed_tokens"] > 0  # encoded on their own, then placed
    assert m["chunk_caches_encoded"] >= 1 and m["chunk_caches_loaded"] == 0
    assert m["reused_tokens"] + m["chunk_tokens"] + m["recomputed_tokens"] + m["prefilled_tokens"] == \
        m["prompt_tokens"]
    repeat = service.ask(QUESTION, "docs", options=ON)  # the same prompt: the assembled prefix serves it
    assert repeat.metrics["chunk_tokens"] >= m["chunk_tokens"] and repeat.metrics["chunk_caches_loaded"] == 0
    # Another setting never reads that prefix (its pages carry the setting): the chunk caches serve it.
    again = make_service(chunk_boundary_tokens=8).ask(QUESTION, "docs", options=ON)
    assert again.metrics["chunk_caches_loaded"] >= 1 and again.metrics["chunk_caches_encoded"] == 0
    assert service.cache_stats()["chunk_caches"]["entries"] == len(_chunk_entries(service)) > 0


def test_full_boundary_recompute_gives_the_plain_answer(make_service, corpus_dir):
    """A boundary as long as every chunk recomputes every chunk token: the answer is the one without reuse."""
    plain = make_service()
    plain.ingest_paths("docs", [str(corpus_dir)])
    expected = plain.ask(QUESTION, "docs", options=OFF)
    plain.clear_cache()
    full = make_service(chunk_boundary_tokens=100_000).ask(QUESTION, "docs", options=ON)
    assert full.metrics["chunk_tokens"] == 0 and full.metrics["recomputed_tokens"] > 0
    assert full.answer == expected.answer


def test_an_assembled_cache_never_serves_as_an_exact_prefix(service):
    cold = service.ask(QUESTION, "docs", options=OFF)
    service.clear_cache()
    assembled = service.ask(QUESTION, "docs", options=ON)
    assert assembled.metrics["chunk_tokens"] > 0
    exact = service.ask(QUESTION, "docs", options=OFF)  # same prompt, reuse off: exact pages only
    assert exact.metrics["reused_tokens"] == assembled.metrics["reused_tokens"]
    assert exact.metrics["chunk_tokens"] == 0 and exact.answer == cold.answer


def test_a_follow_up_reuses_the_assembled_turn(service):
    first = service.ask(QUESTION, "docs", options=ON)
    second = service.ask(QUESTION + " Explain again.", "docs", first.session_id, options=ON)
    m = second.metrics
    assert m["reused_tokens"] + m["chunk_tokens"] >= first.metrics["prompt_tokens"] - 1


def test_a_damaged_chunk_cache_is_quarantined_and_recomputed(service, make_service):
    service.ask(QUESTION, "docs", options=ON)  # encodes the chunk caches; the session pins them
    other = make_service(chunk_boundary_tokens=8)
    reference = other.ask(QUESTION, "docs", options=ON)
    assert reference.metrics["chunk_caches_loaded"] >= 1
    other.delete_session(reference.session_id)
    service.store.clear()  # drops the reference's assembled pages; the first session's pins keep the chunks
    for _key, path in _chunk_entries(service):
        blob = service.settings.blobs_dir / path
        data = bytearray(blob.read_bytes())
        data[-5] ^= 0xFF
        blob.write_bytes(bytes(data))
    again = other.ask(QUESTION, "docs", options=ON)
    assert again.metrics["chunk_caches_loaded"] == 0 and again.metrics["chunk_caches_encoded"] >= 1
    assert again.answer == reference.answer
    with service.store.engine.connect() as conn:
        assert conn.execute(select(Quarantined.key)).first() is not None


def test_an_edited_chunk_never_reuses_its_old_cache(service, make_service, corpus_dir):
    service.ask(QUESTION, "docs", options=ON)
    before = {key for key, _ in _chunk_entries(service)}
    doc = corpus_dir / "cache.md"
    doc.write_text(doc.read_text().replace("sha256", "blake2b"))
    service.ingest_paths("docs", [str(corpus_dir)])
    edited = make_service(chunk_boundary_tokens=8).ask(QUESTION, "docs", options=ON)
    assert any("blake2b" in s["text"] for s in edited.sources)
    assert edited.metrics["chunk_caches_encoded"] >= 1
    assert {key for key, _ in _chunk_entries(service)} - before  # the edited chunk got a cache of its own


def test_eviction_never_drops_a_chunk_cache_an_ask_uses(make_service, corpus_dir):
    tiny_budget = make_service(cache_budget_bytes=200_000)
    tiny_budget.ingest_paths("docs", [str(corpus_dir)])
    result = tiny_budget.ask(QUESTION, "docs", options=ON)
    keys = {key for key, _ in _chunk_entries(tiny_budget)}
    tiny_budget.store.evict(force=True)
    tiny_budget.ask(OTHER, "docs", options=ON)
    left = {key for key, _ in _chunk_entries(tiny_budget)}
    assert keys <= left  # pinned by the first session, whatever the budget says
    owner = f"session:{result.session_id}"
    assert all(owner in tiny_budget.store.owners(k) for k in keys)


def test_cli_ask_json_reports_where_tokens_came_from(service, capsys, monkeypatch):
    from app.cli import main

    argv = ["--data-dir", str(service.settings.data_dir), "ask", "--no-server", "--collection", "docs", "--json",
            "--chunk-reuse", QUESTION]
    monkeypatch.setattr("app.commands.assistant._service", lambda settings, with_model=True: service)
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["chunk_tokens"] > 0 and metrics["recomputed_tokens"] > 0
    assert {"reused_tokens", "prefilled_tokens"} <= set(metrics)


def test_encode_at_ingestion_is_resumable_and_serves_asks(make_service, corpus_dir):
    service = make_service()
    service.ingest_paths("docs", [str(corpus_dir)])
    plans = []
    first = service.encode_chunks("docs", on_plan=plans.append)
    assert plans[0].to_encode == first["encoded"] > 0 and first["cached"] == 0
    assert plans[0].bytes_needed > 0 and plans[0].budget_bytes == service.settings.cache_budget_bytes
    again = service.encode_chunks("docs")
    assert again["encoded"] == 0 and again["cached"] == first["encoded"]  # resumable: nothing twice
    result = service.ask(QUESTION, "docs", options=ON)
    assert result.metrics["chunk_caches_loaded"] >= 1 and result.metrics["chunk_caches_encoded"] == 0


def test_a_follow_up_with_new_chunks_reuses_the_whole_previous_turn(make_service, corpus_dir):
    """New chunks go with the new question, after the history: the previous prompt and answer stay an exact
    prefix (exact pages only here: chunk reuse off)."""
    service = make_service(top_k=1)
    service.ingest_paths("docs", [str(corpus_dir)])
    first = service.ask(QUESTION, "docs", options=OFF)
    second = service.ask(OTHER, "docs", first.session_id, options=OFF)
    assert {s["path"] for s in second.sources} - {s["path"] for s in first.sources}  # it retrieved a new chunk
    seen = first.metrics["prompt_tokens"] + first.metrics["new_tokens"] - 1  # the cache held all but the last
    assert second.metrics["reused_tokens"] >= seen
    turns = service.session(first.session_id)[1]
    assert [u["turn"] for u in turns[1].context] == [0, 1]  # the old chunk in the system message, the new one later


def test_chunk_reuse_is_the_default_on_the_cpu_only():
    assert reuse_pays_on(torch.device("cpu"))
    assert not reuse_pays_on(torch.device("cuda", 0))  # a full prefill is faster there (RESULTS.md)


def test_by_default_a_follow_up_reuses_its_past_and_takes_new_chunks_from_chunk_caches(make_service, corpus_dir):
    """Chunk reuse on (the default): the previous turn comes back as its assembled pages, and the new chunk, which
    sits after the history (after an answer spelled with its generated ids), is cut out and taken from a chunk
    cache, not prefilled."""
    service = make_service(top_k=1)
    service.ingest_paths("docs", [str(corpus_dir)])
    service.encode_chunks("docs")
    first = service.ask(QUESTION, "docs")
    second = service.ask(OTHER, "docs", first.session_id)
    assert {s["path"] for s in second.sources} - {s["path"] for s in first.sources}  # it retrieved a new chunk
    m = second.metrics
    seen = first.metrics["prompt_tokens"] + first.metrics["new_tokens"] - 1
    assert m["reused_tokens"] + m["chunk_tokens"] + m["recomputed_tokens"] >= seen
    assert m["chunk_caches_loaded"] == 1 and m["chunk_caches_encoded"] == 0
    assert m["prefilled_tokens"] < 0.1 * m["prompt_tokens"]


def test_a_new_question_on_other_chunks_restores_the_system_prompt_exactly(make_service, corpus_dir):
    """The shared system prompt is kept as an exact entry of its own - by `encode_chunks`, by an assembled ask
    (its exact lead) and by an exact one (a boundary) - so a question whose chunks differ from every earlier
    question's still restores it instead of prefilling it."""
    service = make_service(top_k=1)
    service.ingest_paths("docs", [str(corpus_dir)])
    tokenizer = service.loaded.tokenizer
    service.encode_chunks("docs")
    first = service.ask(QUESTION, "docs")  # nothing asked before: the system prompt came from encode_chunks
    system = first.metrics["reused_tokens"]
    assert system > 0 and system < len(tokenizer.encode_chat(
        [{"role": "system", "content": "x" * 2000}])), "the system prompt, not more"
    for options in (ON, OFF):
        for session in service.sessions():  # an empty store: nothing pinned, nothing kept
            service.delete_session(session.id)
        service.clear_cache()
        cold = service.ask(QUESTION, "docs", options=options)  # stores it again, assembled or exact
        assert cold.metrics["reused_tokens"] == 0
        other = service.ask(OTHER, "docs", options=options)  # another chunk, a new session
        assert {s["path"] for s in other.sources}.isdisjoint({s["path"] for s in first.sources})
        assert other.metrics["reused_tokens"] == system


def test_a_float16_cache_asks_assembles_and_restores(make_service, corpus_dir):
    """A model whose factor cache is narrower than its compute (every model resident in GGUF blocks): its
    pages live in a namespace of their own, chunk caches assemble and recompute in float16, and a restart
    restores them."""
    from tiny import tiny_loaded_model

    loaded = tiny_loaded_model()
    loaded.model.cache_dtype = torch.float16
    service = make_service(model=loaded)
    service.ingest_paths("docs", [str(corpus_dir)])
    first = service.ask(QUESTION, "docs", options=ON)
    second = service.ask(OTHER, "docs", options=ON)
    assert first.metrics["recomputed_tokens"] > 0 and second.metrics["chunk_tokens"] > 0
    assert service.namespace() == service.store.namespace_for(loaded.fingerprint, loaded.config, torch.float16)
    restarted = make_service(model=loaded)
    again = restarted.ask(QUESTION, "docs", options=ON)
    # the assembled prompt's pages, restored from the store (as float16) after the restart
    assert again.metrics["chunk_tokens"] >= first.metrics["chunk_tokens"] > 0
    assert again.metrics["chunk_caches_encoded"] == 0
    assert again.answer == first.answer
