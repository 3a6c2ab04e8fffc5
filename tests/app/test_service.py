"""ChatService on a tiny random model: the ask flow, reuse of cached prefixes, sessions, bad input, overflow."""

from __future__ import annotations

import threading

import pytest

from app.context import ContextOverflowError
from app.errors import AppError
from app.service import AskOptions, QuestionError
from app.sessions import UnknownSessionError
from retrieval.errors import RetrievalError

QUESTION = "How does the cache store key its entries?"
EXACT = AskOptions(chunk_reuse=False)  # exact prefix pages only
# The default (chunk reuse on: an earlier turn's cache comes back as assembled pages) and exact reuse only.
BOTH_MODES = pytest.mark.parametrize("reuse", [None, False], ids=["default", "exact"])


def cached(metrics: dict) -> int:
    """Prompt tokens that came from the store: exact prefix pages plus chunk caches or assembled pages."""
    return metrics["reused_tokens"] + metrics["chunk_tokens"]


def check_mode(metrics: dict, reuse: bool | None) -> None:
    """The default assembles from chunk caches (whose pages an exact ask never reads); exact reuse never does."""
    assert (metrics["chunk_tokens"] > 0) == (reuse is None)


def collect(service, question, collection="docs", session_id="", **kwargs):
    events = list(service.ask_stream(question, collection, session_id, **kwargs))
    return events


def test_ask_streams_cites_and_persists(service):
    events = collect(service, QUESTION)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) <= {"delta"}
    result = events[-1].result
    assert result.answer == "".join(e.text for e in events if e.kind == "delta")
    assert result.session_id == events[0].session_id
    paths = [s["path"] for s in result.sources]
    assert any(p.endswith("cache.md") for p in paths)
    for source in result.sources:
        assert source["start_line"] >= 1 and source["end_line"] >= source["start_line"]
        assert -1 <= source["score"] <= 1 and source["text"]
    metrics = result.metrics
    assert metrics["prompt_tokens"] > 100 and metrics["reused_tokens"] == 0  # a fresh data dir: nothing cached
    assert metrics["ttft_ms"] > 0 and metrics["total_ms"] >= metrics["ttft_ms"]
    body = result.to_json()
    assert set(body) == {"answer", "session_id", "sources", "metrics", "left_out", "ungrounded_terms"}
    assert set(body["sources"][0]) == {"path", "start_line", "end_line", "score"}
    assert set(body["metrics"]) == {"prompt_tokens", "reused_tokens", "chunk_tokens", "recomputed_tokens",
                                    "prefilled_tokens", "ttft_ms", "decode_tokens_per_s", "total_ms"}
    info, turns = service.session(result.session_id)
    assert info.collection == "docs" and len(turns) == 1
    assert turns[0].question == QUESTION and turns[0].answer == result.answer
    assert turns[0].sources == result.sources and turns[0].metrics == result.metrics


@BOTH_MODES
def test_follow_up_reuses_the_cached_prefix(service, reuse):
    options = AskOptions(chunk_reuse=reuse)
    first = service.ask(QUESTION, "docs", options=options)
    second = service.ask(QUESTION + " Explain again.", "docs", first.session_id, options=options)
    assert second.session_id == first.session_id
    assert second.metrics["prompt_tokens"] > first.metrics["prompt_tokens"]  # the first turn is in the prompt
    check_mode(second.metrics, reuse)
    assert cached(second.metrics) >= 256  # at least the context's first page came from the store
    assert len(service.session(first.session_id)[1]) == 2


def test_reused_prefix_gives_the_same_answer_as_a_fresh_prefill(service):
    cold = service.ask(QUESTION, "docs", options=EXACT)
    warm = service.ask(QUESTION, "docs", options=EXACT)  # a new session: same context and question, now cached
    assert warm.metrics["reused_tokens"] > 0 and cold.metrics["reused_tokens"] == 0
    assert warm.answer == cold.answer
    entries = service.cache_stats()["entries"]
    removed = service.clear_cache()  # what no session pins (the context-end tail); the sessions' pages stay
    kept = _all_entry_keys(service.store)
    assert len(kept) == entries - removed > 0 and all(service.store.owners(k) for k in kept)
    service.delete_session(cold.session_id)
    service.delete_session(warm.session_id)
    assert service.clear_cache() == len(kept) and service.cache_stats()["entries"] == 0
    again = service.ask(QUESTION, "docs", options=EXACT)
    assert again.metrics["reused_tokens"] == 0 and again.answer == cold.answer


def test_sessions_are_isolated(service):
    a = service.ask("What is the capital of France?", "docs")
    b = service.ask(QUESTION, "docs")
    assert a.session_id != b.session_id
    assert [t.question for t in service.session(b.session_id)[1]] == [QUESTION]
    b2 = service.ask("And the namespace?", "docs", b.session_id)
    a2 = service.ask("And the tower?", "docs", a.session_id)
    assert [t.question for t in service.session(a.session_id)[1]] == ["What is the capital of France?",
                                                                       "And the tower?"]
    assert [t.question for t in service.session(b.session_id)[1]] == [QUESTION, "And the namespace?"]
    assert cached(b2.metrics) > 0 and cached(a2.metrics) > 0


def test_concurrent_asks_are_serialized_and_complete(service):
    results, errors = {}, []

    def run(name, question):
        try:
            results[name] = service.ask(question, "docs")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"t{i}", f"{QUESTION} ({i})")) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 3
    assert len({r.session_id for r in results.values()}) == 3
    for r in results.values():
        assert len(service.session(r.session_id)[1]) == 1


def test_resume_after_restart_reuses_the_cache(make_service, corpus_dir):
    first_app = make_service()
    first_app.ingest_paths("docs", [str(corpus_dir)])
    first = first_app.ask(QUESTION, "docs")
    first_app.close()
    restarted = make_service()
    info, turns = restarted.session(first.session_id)
    assert len(turns) == 1 and turns[0].answer == first.answer
    follow = restarted.ask("And what is the namespace?", "docs", first.session_id)
    assert cached(follow.metrics) >= 256 and follow.metrics["chunk_tokens"] > 0  # the assembled turn's pages


def test_bad_input_is_refused_and_nothing_is_lost(service):
    first = service.ask(QUESTION, "docs")
    sessions_before = [s.id for s in service.sessions()]
    entries_before = service.cache_stats()["entries"]
    with pytest.raises(QuestionError, match="empty"):
        collect(service, "   ")
    with pytest.raises(QuestionError, match="too long"):
        collect(service, "why " * 5000)
    with pytest.raises(RetrievalError, match="no collection named"):
        collect(service, QUESTION, collection="nope")
    with pytest.raises(UnknownSessionError, match="no such session"):
        collect(service, QUESTION, session_id="0" * 32)
    with pytest.raises(AppError, match="top-k"):
        collect(service, QUESTION, options=service.options(top_k=0))
    with pytest.raises(AppError, match="context window"):
        collect(service, QUESTION, options=service.options(max_new_tokens=10_000))
    with pytest.raises(AppError, match="no document"):
        collect(service, QUESTION, pinned=True, options=service.options(documents=("missing.md",)))
    assert [s.id for s in service.sessions()] == sessions_before
    assert service.cache_stats()["entries"] == entries_before
    assert service.session(first.session_id)[1][0].answer == first.answer


def test_session_of_another_collection_is_refused(service, corpus_dir):
    service.ingest_paths("other", [str(corpus_dir / "notes.txt")])
    first = service.ask(QUESTION, "docs")
    with pytest.raises(AppError, match="belongs to collection 'docs'"):
        collect(service, QUESTION, collection="other", session_id=first.session_id)


def test_pinned_mode_uses_whole_documents_and_reuses_them(service):
    first = service.ask(QUESTION, "docs", pinned=True)
    paths = sorted(s["path"] for s in first.sources)
    assert len(paths) == 3 and all(s["score"] is None for s in first.sources)
    assert all(s["start_line"] == 1 for s in first.sources)
    second = service.ask("What does rope do?", "docs", pinned=True)  # another session, same documents
    assert second.metrics["reused_tokens"] >= 256
    only = service.ask(QUESTION, "docs", pinned=True,
                       options=service.options(documents=(next(p for p in paths if p.endswith("cache.md")),)))
    assert [s["path"] for s in only.sources] == [p for p in paths if p.endswith("cache.md")]


def test_context_overflow_is_reduced_and_reported(make_service, corpus_dir, tmp_path):
    from tiny import tiny_loaded_model

    service = make_service(model=tiny_loaded_model(window=512), max_new_tokens=32)
    big = tmp_path / "big"
    big.mkdir()
    (big / "long.md").write_text("".join(f"Line {i}: the factor cache keeps pages of tokens.\n" for i in range(300)))
    service.ingest_paths("big", [str(big)])
    events = collect(service, QUESTION, collection="big", pinned=True)
    start, result = events[0], events[-1].result
    assert start.left_out and start.left_out == result.left_out
    assert any("long.md lines" in item for item in result.left_out)
    assert result.metrics["prompt_tokens"] <= 512 - 32
    kept = result.sources[0]
    assert kept["start_line"] == 1 and 1 <= kept["end_line"] < 300
    # A question that cannot fit even alone: refused, the session's earlier turn and the cache stay.
    entries = service.cache_stats()["entries"]
    with pytest.raises(ContextOverflowError, match="does not fit"):
        collect(service, "tokens " * 900, collection="big", session_id=result.session_id, pinned=True)
    assert len(service.session(result.session_id)[1]) == 1
    assert service.cache_stats()["entries"] == entries


def test_delete_session_releases_its_pins(service):
    result = service.ask(QUESTION, "docs")
    store = service.store
    keys = [k for k in _all_entry_keys(store) if store.owners(k)]
    assert keys and all(store.owners(k) == [f"session:{result.session_id}"] for k in keys)
    service.delete_session(result.session_id)
    assert not any(store.owners(k) for k in _all_entry_keys(store))
    with pytest.raises(UnknownSessionError):
        service.session(result.session_id)


def test_uploads_reject_unsupported_and_oversized_files(service, tmp_path):
    good = tmp_path / "guide.md"
    good.write_text("# Guide\nThe guide explains the cache.\n")
    binary = tmp_path / "tool.exe"
    binary.write_bytes(b"MZ\x00\x01" * 10)
    huge = tmp_path / "huge.txt"
    huge.write_text("x" * (2 * 1024 * 1024))
    summary = service.ingest("uploaded", uploads=[str(good), str(binary), str(huge)])
    reasons = {r["path"]: r["reason"] for r in summary["rejected"]}
    assert "unsupported file type .exe" in reasons["tool.exe"]
    assert "too large" in reasons["huge.txt"]
    assert [d["path"] for d in summary["documents"]] and summary["chunks_total"] >= 1
    kept = (service.settings.uploads_dir / "uploaded").glob("*/*")  # a folder per upload (app.uploads)
    assert [path.name for path in kept] == ["guide.md"]
    with pytest.raises(AppError, match="nothing to ingest"):
        service.ingest("uploaded", uploads=[str(binary)])


def _all_entry_keys(store):
    from sqlalchemy import select

    from tpa_core.store.tables import Entry

    with store.engine.connect() as conn:
        return list(conn.execute(select(Entry.key)).scalars())


@BOTH_MODES
def test_follow_up_keeps_the_earlier_context_in_place(make_service, corpus_dir, reuse):
    service = make_service(top_k=1)
    service.ingest_paths("docs", [str(corpus_dir)])
    options = AskOptions(chunk_reuse=reuse)
    first = service.ask(QUESTION, "docs", options=options)
    assert [s["path"] for s in first.sources] == ["corpus/cache.md"]
    follow = service.ask("What is the capital of France? Paris?", "docs", first.session_id, options=options)
    # Cited: what this question retrieved, numbered as it appears in the context (after the kept chunk).
    assert [(s["path"], s["ref"]) for s in follow.sources] == [("corpus/notes.txt", 2)]
    turns = service.session(first.session_id)[1]
    assert [c["path"] for c in turns[1].context] == ["corpus/cache.md", "corpus/notes.txt"]
    # All of the first context came from the cache (its pages and the tail kept at its end), although the
    # chunk set changed.
    tokenizer = service.loaded.tokenizer
    system = tokenizer.apply_chat_template([{"role": "system", "content": "s"}], add_generation_prompt=False)
    first_prompt = first.metrics["prompt_tokens"]
    check_mode(follow.metrics, reuse)
    assert cached(follow.metrics) % 256 != 0
    assert cached(follow.metrics) > first_prompt - len(tokenizer.encode(system)) - 40


def test_repetition_detector():
    from app.tokens import repeating

    block = list(range(100, 112))
    assert repeating([1, 2, 3] + block * 3) == 12
    assert repeating([1, 2, 3] + block * 2) == 0  # a short block said twice is not a loop yet
    sentences = list(range(200, 230))  # 30 ids: a sentence or two
    assert repeating([1, 2, 3] + sentences * 2) == 30  # said twice back to back is
    assert repeating([1, 2, 3] + sentences + [4] + sentences) == 0  # not back to back: not a loop
    assert repeating([1] + sentences + sentences[:29]) == 0  # one id short of the second copy
    assert repeating([5, 6] * 30) == 8  # a short cycle is caught at the smallest allowed period
    assert repeating(list(range(300))) == 0
    assert repeating([7] * 7) == 0


def test_a_looping_answer_keeps_one_copy_cut_at_a_sentence_end():
    from app.tokens import LONG_REPEAT_PERIOD, without_loop

    words = {i: f" w{i}" for i in range(100)} | {99: "."}

    def decode(ids):
        return "".join(words[i] for i in ids)

    # a loop whose copies start mid-sentence: "w10 ... w29. w30 w31 w32" said twice after the answer's start
    block = [*range(10, 30), 99, 30, 31, 32]
    assert len(block) >= LONG_REPEAT_PERIOD
    kept = without_loop([1, *block, *block], len(block), decode)
    assert decode(kept) == " w1" + decode(range(10, 30)) + "."
    no_end = list(range(40, 64))  # no sentence end inside the kept copy: the copy as it is
    assert without_loop(no_end * 2, len(no_end), decode) == no_end


@BOTH_MODES
def test_a_new_question_on_the_same_context_reuses_all_of_it(service, reuse):
    options = AskOptions(chunk_reuse=reuse)
    first = service.ask(QUESTION, "docs", options=options)
    other = service.ask("How is the key of an entry made?", "docs", options=options)  # another session, same chunks
    assert sorted(s["path"] for s in other.sources) == sorted(s["path"] for s in first.sources)
    tokenizer = service.loaded.tokenizer
    system_end = len(tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "system", "content": "x"}], add_generation_prompt=False), add_special_tokens=False))
    check_mode(other.metrics, reuse)
    assert cached(other.metrics) % 256 != 0  # a tail (the context's end) was reused, not pages only
    assert cached(other.metrics) > system_end


def test_local_path_ingest_and_collection_delete(make_service, corpus_dir, tmp_path):
    service = make_service(ingest_roots=(tmp_path,))
    service.ingest_paths("docs", [str(corpus_dir)])
    summary = service.ingest("local", local_path=str(corpus_dir))
    assert sorted(d["path"] for d in summary["documents"]) == ["corpus/cache.md", "corpus/model.py",
                                                               "corpus/notes.txt"]
    with pytest.raises(RetrievalError, match="no such file or folder"):
        service.ingest("local", local_path=str(tmp_path / "missing"))
    (tmp_path / "up.md").write_text("# Up\nuploaded text\n")
    service.ingest("local", uploads=[str(tmp_path / "up.md")])
    asked = service.ask(QUESTION, "local")
    service.delete_collection("local")
    assert "local" not in service.collection_names()
    assert not (service.settings.uploads_dir / "local").exists()
    with pytest.raises(UnknownSessionError):
        service.session(asked.session_id)
    assert service.collection_names() == ["docs"]


def test_switching_to_an_unknown_model_keeps_the_current_one(service):
    from tpa_core.errors import TPAError

    before = service.model_name
    with pytest.raises((TPAError, AppError)):
        service.switch_model("no-such-model-anywhere")
    assert service.model_name == before
    assert service.ask(QUESTION, "docs").answer is not None
