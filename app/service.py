"""`ChatService`: the one place where retrieval, the engine and the factor-cache store meet.

The ask flow (architecture.md): retrieve the top-k chunks (or take the pinned documents) -> canonical context
order -> chat template (system + context, earlier turns, question) -> tokenize -> restore the longest cached
prefix from the store -> prefill only the rest -> stream the answer -> save the new pages, pin the session's
prefix, persist the turn with its sources and metrics.

One model worker: a single thread owns the model and the live factor cache and runs one job at a time (an ask,
a model switch, a cache clear), so generation is serialized whatever calls the service (web UI, API, CLI), and
a generator consumed from different threads (as Gradio does) never holds a lock. Sessions are isolated: a prompt
is built only from its own session's turns, and the live cache is restored from the store for every ask.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.asking import (
    MAX_QUESTION_CHARS,
    MAX_TOP_K,
    AskOptions,
    AskPlan,
    QuestionError,
    answer_metrics,
    check_question,
    follow_up_context,
    plan_prompt,
    resolve_options,
)
from app.chunk_reuse import ReuseSetting, restore_assembled, restore_exact
from app.context import ContextUnit, canonical, public_source
from app.database import make_engine
from app.errors import AppError
from app.sessions import SessionInfo, SessionStore, Turn
from app.tokens import REPEATS, repeating
from app.worker import ModelWorker, WorkerClosedError

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024**2
ProgressFn = Callable[[int, int, str], None]  # (done, total, what)
# The metrics `ask --json` and /ask report: where the prompt's tokens came from, and the timings.
PUBLIC_METRICS = ("prompt_tokens", "reused_tokens", "chunk_tokens", "recomputed_tokens", "prefilled_tokens",
                  "ttft_ms", "decode_tokens_per_s", "total_ms")
__all__ = ["MAX_QUESTION_CHARS", "MAX_TOP_K", "AskEvent", "AskOptions", "AskResult", "ChatService", "QuestionError"]


@dataclass
class AskResult:
    """A finished answer: what `tpa-rag ask --json` prints and the `/ask` endpoint returns (`to_json`)."""

    answer: str
    session_id: str
    sources: list[dict]
    metrics: dict
    left_out: list[str] = field(default_factory=list)
    mode: str = "retrieval"
    finish_reason: str = ""

    def to_json(self) -> dict:
        return {
            "answer": self.answer,
            "session_id": self.session_id,
            "sources": [public_source(s) for s in self.sources],
            "metrics": {k: self.metrics.get(k, 0) for k in PUBLIC_METRICS},
            "left_out": list(self.left_out),
        }


@dataclass
class AskEvent:
    """One step of `ask_stream`: "start" (sources chosen, prompt built), "delta" (answer text), "done"."""

    kind: str
    session_id: str
    text: str = ""
    sources: list[dict] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    result: AskResult | None = None


@dataclass
class _AskJob:
    """What the model worker needs for one ask, built in the caller's thread."""

    session_id: str
    question: str
    mode: str
    plan: AskPlan
    max_new_tokens: int
    temperature: float
    chunk_reuse: bool
    t_start: float  # when ask_stream was called
    context: list[dict] = field(default_factory=list)  # retrieval mode: the context as rendered, for follow-ups
    t_submit: float = 0.0  # when the job was handed to the worker (the wait for it is not the ask's latency)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


_DONE = object()


class ChatService:
    """Collections, sessions, asks and the cache, for the web UI, the `/ask` API and the CLI.

    `model` (a `tpa_core.loading.LoadedModel`) and `embedder` (a `retrieval.embeddings.Embedder`) may be
    injected (tests use a tiny random model and a small embedder); otherwise they load from `settings` on first
    use. `load_model=False` makes a service for commands that never generate (sessions, listings).
    """

    def __init__(self, settings: Settings, *, model: Any = None, embedder: Any = None, load_model: bool = True,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> None:
        self.settings = settings
        self.max_upload_bytes = int(max_upload_bytes)
        self._engine = make_engine(settings.db_url)
        self._sessions = SessionStore(self._engine)
        self._embedder = embedder
        self._loaded = model
        self._may_load = load_model
        self._model_name = getattr(model, "name", None) or settings.model
        self._corpus: Any = None
        self._store: Any = None
        self._namespace: str | None = None
        self._cache: Any = None  # the live FactorCache, owned by the worker thread
        self._open_lock = threading.Lock()
        self._worker = ModelWorker()
        self._closed = False

    # ----- lazily opened parts ---------------------------------------------------------------------------------
    @property
    def corpus(self):
        with self._open_lock:
            if self._corpus is None:
                from retrieval import Corpus

                self._corpus = Corpus(self._engine, self.settings.indexes_dir, self.settings.uploads_dir,
                                      embedder=self._embedder_instance())
            return self._corpus

    def _embedder_instance(self):
        if self._embedder is None:
            from retrieval.embeddings import SentenceTransformerEmbedder

            self._embedder = SentenceTransformerEmbedder(self.settings.embedding_model or None)
        return self._embedder

    @property
    def store(self):
        with self._open_lock:
            if self._store is None:
                from tpa_core.store import FactorStore

                self._store = FactorStore.open(self._engine, self.settings.blobs_dir,
                                               self.settings.cache_budget_bytes)
            return self._store

    @property
    def loaded(self):
        """The LoadedModel (loads the configured model on first use)."""
        with self._open_lock:
            if self._loaded is None:
                if not self._may_load:
                    raise AppError("this command does not load a model")
                self._loaded = self._load(self.settings.model)
            return self._loaded

    def _load(self, name: str):
        from tpa_core.loading import load_model

        loaded = load_model(name, self.settings.models_dir, device=self.settings.device)
        loaded.model.attention_backend = self.settings.attention_backend
        if loaded.tokenizer is None:
            raise AppError(f"model {name!r} has no tokenizer; the chat needs one")
        return loaded

    @property
    def model_name(self) -> str:
        return self._model_name

    def model_choices(self) -> list[str]:
        """The known model names and the models already in the model cache, the current one first."""
        names = [self._model_name]
        try:
            from tpa_core.registry import known_names

            names += known_names()
        except ImportError:
            pass
        return list(dict.fromkeys(names))

    def namespace(self) -> str:
        if self._namespace is None:
            loaded = self.loaded
            self._namespace = self.store.namespace_for(loaded, dtype=loaded.dtype)
        return self._namespace

    def warm_up(self) -> None:
        """Load the model and the embedder, open the store and the corpus now (the server does this before it
        listens, so the first question does not pay for it)."""
        self.namespace()
        self.corpus.embedder.embed(["warm up"])

    # ----- collections -----------------------------------------------------------------------------------------
    def collection_names(self) -> list[str]:
        return [c.name for c in self.corpus.list_collections()]

    def document_paths(self, collection: str) -> list[str]:
        return [d.path for d in self.corpus.list_documents(collection)]

    def ingest(self, collection: str, *, uploads: Sequence[str | Path] = (), local_path: str | None = None,
               local_paths: Sequence[str | Path] = (), progress: ProgressFn | None = None) -> dict:
        """Ingest uploaded files (copied into the data folder first) and/or folders, repositories or files on
        this machine (`local_path`, `local_paths`) into `collection` (created if new). Returns the ingestion
        summary (`ingest --json` shape) plus "rejected": uploads refused before ingestion (type or size), each
        with its reason."""
        rejected: list[dict] = []
        targets: list[Path] = []
        if uploads:
            targets += self._save_uploads(collection, uploads, rejected)
        targets += [Path(p).expanduser() for p in ([local_path] if local_path else []) + list(local_paths)]
        if not targets:
            if rejected:
                raise AppError("nothing to ingest: " + "; ".join(f"{r['path']}: {r['reason']}" for r in rejected))
            raise AppError("nothing to ingest: give files, a .zip, a folder or a repository path")

        def report(p) -> None:  # retrieval.records.IngestProgress
            if progress is not None:
                progress(p.files_done, p.files_total, p.path)

        summary = self.corpus.ingest(collection, [str(t) for t in targets], progress=report).to_json()
        summary["rejected"] = rejected
        summary["skipped"] = rejected + summary["skipped"]
        return summary

    def ingest_paths(self, collection: str, paths: Sequence[str], progress: ProgressFn | None = None) -> dict:
        """`ingest` of files, folders or repositories on this machine."""
        return self.ingest(collection, local_paths=paths, progress=progress)

    def _save_uploads(self, collection: str, uploads: Sequence[str | Path], rejected: list[dict]) -> list[Path]:
        """Copy the acceptable uploads into the collection's upload folder; the others go to `rejected`."""
        from retrieval.api import check_collection_name
        from retrieval.extract import supported

        check_collection_name(collection)
        saved: list[Path] = []
        for item in uploads:
            source = Path(item)
            name = source.name
            reason = None
            if not source.is_file():
                reason = "the upload is missing (expired or not a file)"
            elif source.stat().st_size > self.max_upload_bytes:
                reason = (f"too large: {source.stat().st_size / 1024**2:.1f} MiB, the limit is "
                          f"{self.max_upload_bytes / 1024**2:.0f} MiB")
            elif not (supported(name) or name.lower().endswith(".zip")):
                reason = f"unsupported file type {Path(name).suffix or '(none)'}"
            if reason:
                rejected.append({"path": name, "reason": reason})
                continue
            with source.open("rb") as data:
                saved.append(self.corpus.save_upload(collection, name, data))
        return saved

    def encode_chunks(self, collection: str, progress: ProgressFn | None = None,
                      on_plan: Callable[[Any], None] | None = None) -> dict:
        """Encode the chunk caches of `collection`'s chunks that the store lacks (new or changed chunks), on the
        model worker between asks. Resumable: stored caches are skipped. `on_plan(EncodePlan)` hears how many
        chunks and bytes (against the cache budget) before any work. Returns `app.chunk_reuse.encode_units`'s
        summary."""
        from app.chunk_reuse import encode_units

        units = [ContextUnit(collection, c.path, c.idx, c.text, c.start_line, c.end_line)
                 for c in self.corpus.chunk_records(collection)]
        loaded = self.loaded
        namespace = self.namespace()
        return self._run_on_worker(lambda: encode_units(loaded.model, loaded.tokenizer, self.store, namespace,
                                                        units, on_plan=on_plan, progress=progress))

    def ensure_demo_collection(self, name: str, paths: Sequence[str], progress: ProgressFn | None = None) -> bool:
        """Ingest `paths` as collection `name` unless it exists already. Returns whether it ingested."""
        if name in self.collection_names():
            return False
        log.info("first run: indexing %s as the demo collection %r", " ".join(paths), name)
        self.ingest_paths(name, paths, progress)
        return True

    def delete_collection(self, name: str) -> None:
        """Delete the collection, its index and uploads, and its chat sessions (their pins released)."""
        self.corpus.delete_collection(name)
        for info in self._sessions.list(collection=name):
            self.delete_session(info.id)
        shutil.rmtree(self.settings.uploads_dir / name, ignore_errors=True)

    # ----- sessions ----------------------------------------------------------------------------------------------
    def new_session(self, collection: str, name: str = "") -> SessionInfo:
        self.corpus.list_documents(collection)  # raises for an unknown collection
        return self._sessions.create(collection, name)

    def sessions(self, collection: str | None = None) -> list[SessionInfo]:
        return self._sessions.list(collection)

    def session(self, session_id: str) -> tuple[SessionInfo, list[Turn]]:
        return self._sessions.get(session_id), self._sessions.turns(session_id)

    def rename_session(self, session_id: str, name: str) -> SessionInfo:
        return self._sessions.rename(session_id, name)

    def set_pinned_documents(self, session_id: str, paths: Sequence[str]) -> SessionInfo:
        info = self._sessions.get(session_id)
        self._check_documents(info.collection, paths)
        return self._sessions.set_pinned_documents(session_id, paths)

    def delete_session(self, session_id: str) -> SessionInfo:
        """Delete a session and its turns and release its cache pins (its pages become evictable)."""
        info = self._sessions.delete(session_id)
        self.store.unpin(_pin_owner(session_id))
        return info

    def ttft_history(self, session_id: str) -> list[tuple[int, float, int]]:
        """(turn number, TTFT ms, reused tokens) rows for the cache panel's plot."""
        return [(t.position + 1, float(t.metrics["ttft_ms"]), int(t.metrics.get("reused_tokens", 0)))
                for t in self._sessions.turns(session_id) if "ttft_ms" in t.metrics]

    # ----- the cache ----------------------------------------------------------------------------------------------
    def cache_stats(self) -> dict:
        """entries, bytes, hit_rate (over the store's life), and what the store counts besides; "chunk_caches":
        the entries, bytes and pins of the chunk caches among them."""
        from tpa_core.store.chunks import ChunkCaches

        stats = self.store.stats().to_dict()
        stats["chunk_caches"] = ChunkCaches(self.store).stats()
        return stats

    def clear_cache(self) -> int:
        """Delete every cache page that no session pins. Runs on the model worker (after any ask in flight)."""
        return self._run_on_worker(lambda: self.store.clear())

    def switch_model(self, name: str) -> None:
        """Load another model (on the worker, between asks). Its caches live in their own namespace."""
        name = (name or "").strip()
        if not name:
            raise AppError("name a model (a known name, a local folder or a .gguf file)")
        if name == self._model_name and self._loaded is not None:
            return

        def swap() -> None:
            loaded = self._load(name)
            self._loaded, self._model_name, self._namespace, self._cache = loaded, name, None, None

        self._run_on_worker(swap)

    # ----- asking ---------------------------------------------------------------------------------------------------
    def options(self, **values: Any) -> AskOptions:
        return AskOptions(**values)

    def ask(self, question: str, collection: str, session_id: str = "", *, pinned: bool = False,
            options: AskOptions | None = None) -> AskResult:
        """`ask_stream` run to the end."""
        result = None
        for event in self.ask_stream(question, collection, session_id, pinned=pinned, options=options):
            if event.kind == "done":
                result = event.result
        assert result is not None
        return result

    def ask_stream(self, question: str, collection: str, session_id: str = "", *, pinned: bool = False,
                   options: AskOptions | None = None) -> Iterator[AskEvent]:
        """Answer `question` about `collection` in session `session_id` ("" = a new session).

        Yields a "start" event (the session id, the sources and what was left out to fit the window), "delta"
        events with the answer text, and a "done" event with the `AskResult`. User mistakes (empty or oversized
        question, unknown collection, session or document, a question that cannot fit) raise before the start
        event, and nothing is changed by them.
        """
        t_start = time.perf_counter()
        question = check_question(question)
        info = self._sessions.get(session_id) if session_id else None
        if info is not None and info.collection != collection:
            raise AppError(f"session {session_id} belongs to collection {info.collection!r}, not {collection!r}; "
                           f"start a new session to ask about {collection!r}")
        loaded = self.loaded
        opts = resolve_options(options or AskOptions(), self.settings, loaded.context_window)
        turns = self._sessions.turns(info.id) if info else []
        if pinned:
            documents = (options.documents if options else None) or (
                tuple(info.pinned_documents) if info else ()) or None
            units = canonical(self._pinned_units(collection, documents))
            hits: set = {u.sort_key for u in units}
        else:
            retrieved = self._retrieved_units(collection, question, opts.top_k)
            hits = {u.sort_key for u in retrieved}
            earlier = turns[-1].context if turns and turns[-1].mode == "retrieval" else []
            units = follow_up_context([ContextUnit.from_dict(d) for d in earlier], retrieved, turn=len(turns))
        plan = plan_prompt(loaded.tokenizer, units, turns, question, hits=hits,
                           budget=loaded.context_window - opts.max_new_tokens, pinned=pinned)
        if info is None:
            info = self._sessions.create(collection)
        job = _AskJob(
            session_id=info.id, question=question, mode="pinned" if pinned else "retrieval", plan=plan,
            max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, chunk_reuse=opts.chunk_reuse,
            t_start=t_start,
            context=[] if pinned else [u.to_dict() for u in plan.units],
        )
        yield AskEvent("start", info.id, sources=plan.sources, left_out=plan.left_out)
        job.t_submit = time.perf_counter()
        try:
            self._worker.submit(self._ask_job(job))
        except WorkerClosedError:
            raise AppError("the service is closed") from None
        finished = False
        try:
            while True:
                item = job.events.get()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                job.cancelled.set()  # the consumer went away: stop generating, keep the cache pages

    def reuse_setting(self) -> ReuseSetting:
        """How retrieved chunks are joined when chunk reuse is on (the settings' boundary tokens and ratio)."""
        return ReuseSetting(int(self.settings.chunk_boundary_tokens), float(self.settings.chunk_recompute_ratio))

    # ----- the model worker -----------------------------------------------------------------------------------------
    def _run_on_worker(self, fn: Callable[[], Any]) -> Any:
        try:
            return self._worker.call(fn)
        except WorkerClosedError:
            raise AppError("the service is closed") from None

    def _ask_job(self, job: _AskJob) -> Callable[[], None]:
        def run() -> None:
            try:
                self._run_ask(job)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer of the stream
                if not isinstance(exc, AppError):
                    log.exception("ask in session %s failed", job.session_id)
                job.events.put(exc)
            finally:
                job.events.put(_DONE)

        return run

    def _run_ask(self, job: _AskJob) -> None:
        """Restore -> prefill the rest -> stream -> save pages, pin, persist the turn. Runs on the worker."""
        from tpa_core.generate import GenerationConfig, generate

        loaded = self.loaded
        store, namespace = self.store, self.namespace()
        if self._cache is None:
            self._cache = loaded.model.new_cache(batch_size=1, capacity=1024)
        cache = self._cache
        cache.reset()
        queued_s = time.perf_counter() - job.t_submit  # waiting for other asks: not this ask's latency
        prompt_ids = job.plan.prompt_ids
        owner = _pin_owner(job.session_id)
        setting = self.reuse_setting()
        if job.chunk_reuse and job.plan.spans:
            restored = restore_assembled(loaded.model, store, namespace, prompt_ids, cache, job.plan.spans, setting,
                                         owner)
        else:
            restored = restore_exact(store, namespace, prompt_ids, cache)
        config = GenerationConfig(max_new_tokens=job.max_new_tokens, temperature=job.temperature)
        answer_ids: list[int] = []
        parts: list[str] = []
        t_first = t_last = 0.0
        prefill_ms = None
        finish = ""
        for event in generate(loaded.model, loaded.tokenizer, prompt_ids, config, cache=cache):
            t_last = time.perf_counter()
            if not answer_ids:
                t_first = t_last
            answer_ids += event.token_ids
            if event.text:
                parts.append(event.text)
                job.events.put(AskEvent("delta", job.session_id, text=event.text))
            if event.done:
                finish, prefill_ms = event.finish_reason, event.metrics.prefill_ms
            elif job.cancelled.is_set():
                break
            elif period := repeating(answer_ids):
                finish = "repetition"
                break
        # The cache holds the prompt and the answer but its last token; the next question of the session starts
        # with exactly these tokens (its prompt spells this answer with these ids, see app.tokens).
        # An assembled cache is approximate: its pages go under extras that exact lookups never see.
        seen = (prompt_ids + answer_ids)[:cache.length(0)]
        extras = setting.extras() if restored.assembled else None
        store.unpin(owner)
        store.pin(store.prefix_keys(namespace, seen, extras=extras) + restored.chunk_keys, owner)
        store.save(namespace, seen, cache, boundaries=[b for b in job.plan.boundaries if b < len(seen)],
                   extras=extras)
        if not finish:
            log.info("ask in session %s cancelled after %d tokens", job.session_id, len(answer_ids))
            return
        if finish == "repetition":  # keep one copy of the repeated text
            spelled = answer_ids[:len(answer_ids) - (REPEATS - 1) * period]
            answer = loaded.tokenizer.decode(spelled)
        else:
            spelled = answer_ids[:-1] if finish == "eos" else answer_ids  # the end-of-turn token is the template's
            answer = "".join(parts)
        result_metrics = answer_metrics(
            prompt_tokens=len(prompt_ids), reuse=restored.metrics(len(prompt_ids)), t_start=job.t_start,
            t_first=t_first, t_last=t_last,
            t_end=time.perf_counter(), queued_s=queued_s, n_new=len(answer_ids), prefill_ms=prefill_ms,
            finish=finish)
        plan = job.plan
        self._sessions.add_turn(job.session_id, job.question, answer, mode=job.mode, sources=plan.sources,
                                metrics=result_metrics, left_out=plan.left_out, answer_ids=spelled,
                                context=job.context)
        result = AskResult(answer=answer, session_id=job.session_id, sources=plan.sources, metrics=result_metrics,
                           left_out=plan.left_out, mode=job.mode, finish_reason=finish)
        job.events.put(AskEvent("done", job.session_id, sources=plan.sources, left_out=plan.left_out,
                                result=result))

    # ----- context -----------------------------------------------------------------------------------------------
    def _retrieved_units(self, collection: str, question: str, top_k: int) -> list[ContextUnit]:
        hits = self.corpus.search(collection, question, k=top_k)[0]
        return [
            ContextUnit(collection, h.path, h.chunk_index, h.text, h.start_line, h.end_line, float(h.score))
            for h in hits
        ]

    def _pinned_units(self, collection: str, documents: Sequence[str] | None) -> list[ContextUnit]:
        if documents:
            self._check_documents(collection, documents)
        texts = self.corpus.document_texts(collection, list(documents) if documents else None)
        units = []
        for doc in texts:
            n_lines = max(1, len(doc.text.splitlines()))
            units.append(ContextUnit(collection, doc.path, 0, doc.text, 1, n_lines, None))
        if not units:
            raise AppError(f"collection {collection!r} has no documents to pin; ingest some first")
        return units

    def _check_documents(self, collection: str, paths: Sequence[str]) -> None:
        known = set(self.document_paths(collection))
        missing = [p for p in paths if p not in known]
        if missing:
            raise AppError(f"collection {collection!r} has no document {', '.join(map(repr, missing[:5]))}")

    # ----- lifecycle ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker (after the job in flight) and release the database connections."""
        if self._closed:
            return
        self._closed = True
        self._worker.close()
        self._engine.dispose()


def _pin_owner(session_id: str) -> str:
    return f"session:{session_id}"
