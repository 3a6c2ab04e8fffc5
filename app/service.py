"""`ChatService`: the one place where retrieval, the engine and the factor-cache store meet.

The ask flow: retrieve the top-k chunks (or take the pinned documents) -> canonical context
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
import uuid
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
    check_sampling,
    check_window,
    follow_up_context,
    plan_prompt,
    relevance_order,
    resolve_options,
    system_prompt,
)
from app.chunk_reuse import Restored, ReuseSetting, restore_assembled, restore_exact, reuse_pays_on, save_exact_lead
from app.context import ContextOverflowError, ContextUnit, bound_pinned, canonical, public_source
from app.database import make_engine
from app.errors import AppError
from app.focus import focus_units
from app.grounding import ungrounded_terms
from app.intake import NotAllowedError, accept_uploads, check_server_path
from app.retrieval_plan import RetrievalPlan, choose_plan, within_budget
from app.sessions import SessionInfo, SessionStore, Turn
from app.spellings import AnswerSpellings
from app.tokens import encode_conversation, repeating, without_loop
from app.ui_render import TurnCost
from app.worker import ModelWorker, WorkerClosedError

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024**2
# A token rarely spans more characters than this: pinned text past window x this cannot fit, so it is never
# tokenized (a pinned ask on a huge collection stays as cheap as one on a window's worth of text).
PINNED_CHARS_PER_TOKEN = 16
HEARTBEAT_S = 5.0  # a "waiting" event comes after this long without another (a job waiting for the worker)
ProgressFn = Callable[[int, int, str], None]  # (done, total, what)
# The metrics `ask --json` and /ask report: where the prompt's tokens came from, and the timings.
PUBLIC_METRICS = ("prompt_tokens", "reused_tokens", "chunk_tokens", "recomputed_tokens", "prefilled_tokens",
                  "ttft_ms", "decode_tokens_per_s", "total_ms")
__all__ = ["MAX_QUESTION_CHARS", "MAX_TOP_K", "AskEvent", "AskOptions", "AskResult", "ChatService", "NotAllowedError",
           "QuestionError"]


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
            "ungrounded_terms": list(self.metrics.get("ungrounded_terms", [])),
        }


@dataclass
class AskEvent:
    """One step of `ask_stream`: "start" (sources chosen, prompt built), "delta" (answer text), "done"; and
    "waiting" (nothing new for `HEARTBEAT_S`, e.g. other asks have the model: a server keeps its connection
    alive with it, everyone else ignores it)."""

    kind: str
    session_id: str
    text: str = ""
    sources: list[dict] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    result: AskResult | None = None


@dataclass
class _AskJob:
    """What the model worker needs for one ask, built in the caller's thread. `session_id` "": a stateless
    ask (the OpenAI-compatible API): no session turn is saved, the answer's spelling is recorded instead."""

    session_id: str
    question: str
    mode: str
    plan: AskPlan
    max_new_tokens: int
    temperature: float
    t_start: float  # when ask_stream was called
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    chunk_reuse: bool | None = False  # assemble from chunk caches (retrieval mode); None: where it pays
    contrast: float = 0.0  # context-aware decoding's weight, against `plan.contrast_ids`; 0: off
    context: list[dict] = field(default_factory=list)  # retrieval mode: the context as rendered, for follow-ups
    t_submit: float = 0.0  # when the job was handed to the worker (the wait for it is not the ask's latency)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Generated:
    """What one ask's generation produced on the worker (`ChatService._generate`)."""

    restored: Restored  # where the prompt's cached tokens came from
    answer_ids: list[int]
    parts: list[str]  # the answer's text as it streamed
    finish: str  # "" = cancelled
    period: int  # the repeated stretch's length, for finish "repetition"
    t_first: float
    t_last: float
    prefill_ms: float | None


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
        self._spellings = AnswerSpellings(self._engine)
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
                                      embedder=self._embedder_instance(), limits=self.settings.ingest_limits())
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

        loaded = load_model(name, self.settings.models_dir, device=self.settings.device,
                            weights=self.settings.weights)
        loaded.model.attention_backend = self.settings.attention_backend
        if loaded.tokenizer is None:
            raise AppError(f"model {name!r} has no tokenizer; the chat needs one")
        return loaded

    @property
    def model_name(self) -> str:
        return self._model_name

    def model_choices(self) -> list[str]:
        """The models web visitors may switch to: the current one first, the configured one, the listed ones."""
        return list(dict.fromkeys([self._model_name, self.settings.model, *self.settings.models]))

    def namespace(self) -> str:
        if self._namespace is None:
            loaded = self.loaded
            self._namespace = self.store.namespace_for(loaded)  # keyed by its cache dtype
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
               progress: ProgressFn | None = None) -> dict:
        """Ingest uploaded files (copied into the data folder first) and/or a folder or repository on this
        machine, which must lie inside one of `settings.ingest_roots` (`app.intake`), into `collection` (created
        if new). Returns the ingestion summary (`ingest --json` shape) plus "rejected": uploads refused before
        ingestion (type or size), each with its reason."""
        from retrieval.corpus import check_collection_name

        check_collection_name(collection)
        accepted = accept_uploads(uploads, self.settings.uploads_dir / collection, self.max_upload_bytes)
        targets = list(accepted.targets)
        if local_path:
            targets.append(check_server_path(local_path, self.settings.ingest_roots, self.settings.data_dir))
        if not targets:
            if accepted.rejected:
                raise AppError("nothing to ingest: " + "; ".join(f"{r['path']}: {r['reason']}"
                                                                 for r in accepted.rejected))
            raise AppError("nothing to ingest: give files, a .zip, a folder or a repository path")
        summary = self.ingest_paths(collection, targets, progress)
        summary["rejected"] = accepted.rejected
        summary["skipped"] = accepted.rejected + summary["skipped"]
        return summary

    def ingest_paths(self, collection: str, paths: Sequence[str | Path], progress: ProgressFn | None = None) -> dict:
        """`ingest` of files, folders or repositories on this machine, for its local administrator (the CLI,
        tests): no ingest-root check, unlike a web visitor's `local_path`."""
        def report(p) -> None:  # retrieval.records.IngestProgress
            if progress is not None:
                progress(p.files_done, p.files_total, p.path)

        paths = [str(Path(p).expanduser()) for p in paths]
        return self.corpus.ingest(collection, paths, progress=report).to_json()

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

    def ensure_demo_collection(self, name: str, paths: Sequence[str], progress: Callable[[Any], None] | None = None
                               ) -> bool:
        """Ingest `paths` as collection `name` unless it exists already. `progress` receives the ingestion's
        `retrieval.IngestProgress` events (files and chunks done). Returns whether it ingested."""
        if name in self.collection_names():
            return False
        log.info("first run: indexing %s as the demo collection %r", " ".join(paths), name)
        self.corpus.ingest(name, list(paths), progress=progress)
        return True

    def delete_collection(self, name: str) -> None:
        """Delete the collection, its index and uploads, and its chat sessions (their pins released)."""
        self.corpus.delete_collection(name)
        for info in self._sessions.list(collection=name):
            self.delete_session(info.id)
        shutil.rmtree(self.settings.uploads_dir / name, ignore_errors=True)

    # ----- sessions ----------------------------------------------------------------------------------------------
    # `owner` (app.owners) is the web visitor a call is made for: they reach their own sessions only, and another's
    # id is answered like an unknown one. None = the local administrator (CLI), who reaches every session.
    def new_session(self, collection: str, name: str = "", owner: str | None = None) -> SessionInfo:
        self.corpus.list_documents(collection)  # raises for an unknown collection
        return self._sessions.create(collection, name, owner=owner)

    def sessions(self, collection: str | None = None, owner: str | None = None) -> list[SessionInfo]:
        return self._sessions.list(collection, owner=owner)

    def session(self, session_id: str, owner: str | None = None) -> tuple[SessionInfo, list[Turn]]:
        return self._sessions.get(session_id, owner), self._sessions.turns(session_id, owner)

    def rename_session(self, session_id: str, name: str, owner: str | None = None) -> SessionInfo:
        return self._sessions.rename(session_id, name, owner)

    def set_pinned_documents(self, session_id: str, paths: Sequence[str], owner: str | None = None) -> SessionInfo:
        info = self._sessions.get(session_id, owner)
        self._check_documents(info.collection, paths)
        return self._sessions.set_pinned_documents(session_id, paths, owner)

    def delete_session(self, session_id: str, owner: str | None = None) -> SessionInfo:
        """Delete a session and its turns and release its cache pins (its pages become evictable)."""
        info = self._sessions.delete(session_id, owner)
        self.store.unpin(_pin_owner(session_id))
        return info

    def ttft_history(self, session_id: str, owner: str | None = None) -> list[TurnCost]:
        """What each turn of the session cost (time to first token, prompt tokens and where they came from): the
        cache panel's chart."""
        return [TurnCost(t.position + 1, float(t.metrics["ttft_ms"]), int(t.metrics.get("prompt_tokens", 0)),
                         int(t.metrics.get("reused_tokens", 0)), int(t.metrics.get("chunk_tokens", 0)),
                         int(t.metrics.get("recomputed_tokens", 0)))
                for t in self._sessions.turns(session_id, owner) if "ttft_ms" in t.metrics]

    # ----- the cache ----------------------------------------------------------------------------------------------
    def cache_stats(self) -> dict:
        """entries, bytes, hit_rate (over the store's life), and what the store counts besides; "chunk_caches":
        the entries, bytes and pins of the chunk caches among them."""
        from tpa_core.store.chunks import ChunkCaches

        stats = self.store.stats().to_dict()
        stats["chunk_caches"] = ChunkCaches(self.store).stats()
        return stats

    def cache_usage(self, sessions: Sequence[SessionInfo]) -> dict:
        """The cache panel's words: the store's statistics, tokens stored and bytes per token, and which of
        `sessions` (the ones the asker may see) pin how much (largest first)."""
        from tpa_core.store.usage import pinned_by_owner, stored_tokens

        stats = self.cache_stats()
        tokens = stored_tokens(self.store.engine)
        by_owner = {u.owner: u for u in pinned_by_owner(self.store.engine, prefix=_pin_owner(""))}
        pinned = [(info, by_owner[_pin_owner(info.id)]) for info in sessions if _pin_owner(info.id) in by_owner]
        pinned.sort(key=lambda item: -item[1].bytes)
        return {**stats, "tokens": tokens, "bytes_per_token": stats["bytes"] / tokens if tokens else None,
                "sessions": [{"session_id": info.id, "name": info.name, "collection": info.collection,
                              "bytes": usage.bytes, "tokens": usage.tokens} for info, usage in pinned]}

    def unpin_session(self, session_id: str, owner: str | None = None) -> int:
        """Release a session's cache pins (its pages become evictable; the chat stays). Returns links removed."""
        self._sessions.get(session_id, owner)  # raises for an unknown (or another owner's) session
        return self._run_on_worker(lambda: self.store.unpin(_pin_owner(session_id)))

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
        if name not in self.model_choices():  # never touches the file system: says nothing about paths
            raise NotAllowedError(f"this server does not offer the model {name!r}; it offers "
                                  f"{', '.join(self.model_choices())} (its operator lists more with "
                                  f"TPA_RAG_MODELS or `tpa-rag serve --offer-model`)")

        def swap() -> None:
            loaded = self._load(name)
            self._loaded, self._model_name, self._namespace, self._cache = loaded, name, None, None

        self._run_on_worker(swap)

    # ----- asking ---------------------------------------------------------------------------------------------------
    def options(self, **values: Any) -> AskOptions:
        return AskOptions(**values)

    def ask(self, question: str, collection: str, session_id: str = "", *, pinned: bool = False,
            options: AskOptions | None = None, owner: str | None = None) -> AskResult:
        """`ask_stream` run to the end."""
        result = None
        for event in self.ask_stream(question, collection, session_id, pinned=pinned, options=options, owner=owner):
            if event.kind == "done":
                result = event.result
        assert result is not None
        return result

    def check_ask(self, question: str, collection: str, session_id: str = "", *, pinned: bool = False,
                  options: AskOptions | None = None, owner: str | None = None) -> None:
        """The checks of an ask that need no model (question, collection, session, documents, top-k), so a
        command can refuse a mistake before it loads or fetches the model. `ask_stream` checks again."""
        opts = options or AskOptions()
        check_question(question)
        self.document_paths(collection)  # raises for an unknown collection
        if session_id:
            self._sessions.get(session_id, owner)
        if pinned and opts.documents:
            self._check_documents(collection, opts.documents)
        resolve_options(opts, self.settings)

    def ask_stream(self, question: str, collection: str, session_id: str = "", *, pinned: bool = False,
                   options: AskOptions | None = None, owner: str | None = None,
                   history: Sequence[tuple[str, str]] | None = None) -> Iterator[AskEvent]:
        """Answer `question` about `collection` in session `session_id` ("" = a new session owned by `owner`;
        an existing one must be `owner`'s, see the sessions section).

        Returns an iterator of a "start" event (the session id, the sources and what was left out to fit the
        window), "delta" events with the answer text, and a "done" event with the `AskResult`; the answer is
        generated as it is consumed. User mistakes (empty or oversized question, unknown collection, session or
        document, a question that cannot fit) raise at the call, and nothing is changed by them.

        `history` (earlier (question, answer) turns, given by the caller) makes a stateless ask instead: no
        session is created or continued (the result's session id is ""), and an earlier answer this service
        generated is spelled with its generated ids and keeps its retrieval context in place (`app.spellings`).
        """
        t_start = time.perf_counter()
        options = options or AskOptions()
        question = check_question(question)
        if history is not None and session_id:
            raise AppError("give either a session to continue or the earlier turns, not both")
        info = self._sessions.get(session_id, owner) if session_id else None
        if info is not None and info.collection != collection:
            raise AppError(f"session {session_id} belongs to collection {info.collection!r}, not {collection!r}; "
                           f"start a new session to ask about {collection!r}")
        opts = resolve_options(options, self.settings)
        loaded = self.loaded
        window = loaded.context_window
        check_window(opts.max_new_tokens, window)

        if history is not None:
            self.corpus.list_documents(collection)  # raises for an unknown collection
            turns = self._client_turns(history, collection)
        else:
            turns = self._sessions.turns(info.id) if info else []
        over_bound: list[str] = []
        if pinned:
            documents = options.documents or (tuple(info.pinned_documents) if info else ()) or None
            units, over_bound = bound_pinned(canonical(self._pinned_units(collection, documents)),
                                             window * PINNED_CHARS_PER_TOKEN)
            hits: set = {u.sort_key for u in units}
        else:
            amount = self.retrieval_plan(opts.top_k, opts.context_tokens)
            retrieved = self._retrieved_units(collection, question, amount.top_k, opts.hybrid)
            if amount.context_tokens is not None:
                retrieved = within_budget(retrieved, lambda u: len(loaded.tokenizer.encode(u.text)),
                                          amount.context_tokens)
            if opts.context_focus:
                retrieved = focus_units(question, retrieved, opts.context_focus)
            hits = {u.sort_key for u in retrieved}
            earlier = turns[-1].context if turns and turns[-1].mode == "retrieval" else []
            units = follow_up_context([ContextUnit.from_dict(d) for d in earlier], retrieved, turn=len(turns))
            if opts.context_order == "relevance" and not earlier:
                units = relevance_order(units)
        plan = plan_prompt(loaded.tokenizer, units, turns, question, hits=hits,
                           budget=window - opts.max_new_tokens, pinned=pinned, system=system_prompt(options),
                           contrast=opts.contrast > 0)
        plan.left_out = plan.left_out + over_bound
        if history is not None:  # a client that drops or edits our answer still reuses this whole prompt
            plan.boundaries.append(len(plan.prompt_ids))
        if info is None and history is None:
            info = self._sessions.create(collection, owner=owner)
        job = _AskJob(
            session_id=info.id if info else "", question=question, mode="pinned" if pinned else "retrieval",
            plan=plan, max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, t_start=t_start,
            top_p=opts.top_p, seed=opts.seed, stop=opts.stop, chunk_reuse=opts.chunk_reuse,
            context=[] if pinned else [u.to_dict() for u in plan.units], contrast=opts.contrast,
        )
        return self._stream(job)

    def chat_stream(self, messages: Sequence[dict[str, str]], options: AskOptions | None = None
                    ) -> Iterator[AskEvent]:
        """A plain chat with the model over `messages` (role "system", "user" or "assistant", text content):
        no collection, no session. Same events as `ask_stream` (no sources); the result's session id is "".

        The prompt goes through the same restore -> prefill the rest -> save path as an ask, so a client that
        sends a growing conversation reuses its cached prefix turn after turn; an assistant message this service
        generated is spelled with its generated ids (`app.spellings`). Without an explicit `max_new_tokens` the
        settings' value is cut to what the context window leaves. Raises before the start event for a bad
        conversation or one that does not fit.
        """
        t_start = time.perf_counter()
        opts = options or AskOptions()
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if not messages:
            raise AppError("the conversation is empty; send at least one message")
        for index, message in enumerate(messages):
            if message["role"] not in ("system", "user", "assistant") or not isinstance(message["content"], str):
                raise AppError(f"message {index} must have the role system, user or assistant and text content")
        max_new, temperature = check_sampling(opts, self.settings)
        loaded = self.loaded
        tokenizer, window = loaded.tokenizer, loaded.context_window
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        found = self._spellings.find(self.namespace(), answers) if answers else {}
        prompt_ids = encode_conversation(tokenizer, messages, {
            i: found[m["content"]].token_ids for i, m in enumerate(messages)
            if m["role"] == "assistant" and m["content"] in found})
        room = window - len(prompt_ids)
        if opts.max_new_tokens is None:
            max_new = min(max_new, room)
        if room < 1 or max_new > room:
            raise ContextOverflowError(
                f"the conversation does not fit the model's context window: the prompt has {len(prompt_ids)} "
                f"tokens, {max_new if max_new > 0 else 1} more are asked for the answer and the window holds "
                f"{window}; shorten the conversation or ask for fewer tokens")
        boundaries = [len(prompt_ids)]
        if messages[0]["role"] == "system":  # a new conversation with the same system prompt reuses it
            from tpa_core.errors import TPAError

            try:
                head = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=False)
            except TPAError:  # a template that wants a user message after the system prompt: no boundary
                head = None
            head_ids = tokenizer.encode(head, add_special_tokens=False) if head else []
            if head_ids and prompt_ids[:len(head_ids)] == head_ids:
                boundaries.append(len(head_ids))
        plan = AskPlan(prompt_ids=prompt_ids, units=[], sources=[], left_out=[], kept_turns=0,
                       boundaries=sorted(boundaries))
        job = _AskJob(
            session_id="", question="", mode="chat", plan=plan, max_new_tokens=max_new, temperature=temperature,
            t_start=t_start, top_p=opts.top_p if opts.top_p is not None else 1.0, seed=opts.seed,
            stop=tuple(opts.stop),
        )
        return self._stream(job)

    def _stream(self, job: _AskJob) -> Iterator[AskEvent]:
        """The start event, then the worker's events for `job`. The job goes to the worker when the start event
        is taken, so jobs reach it in the order their start events are taken."""
        job.t_submit = time.perf_counter()
        try:
            self._worker.submit(self._ask_job(job))
        except WorkerClosedError:
            raise AppError("the service is closed") from None
        finished = False
        try:
            yield AskEvent("start", job.session_id, sources=job.plan.sources, left_out=job.plan.left_out)
            while True:
                try:
                    item = job.events.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    yield AskEvent("waiting", job.session_id)
                    continue
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
            except BaseException as exc:  # handed to the consumer of the stream
                if not isinstance(exc, AppError):
                    log.exception("ask in session %s failed", job.session_id)
                job.events.put(exc)
            finally:
                job.events.put(_DONE)

        return run

    def _run_ask(self, job: _AskJob) -> None:
        """Restore -> prefill the rest -> stream -> save pages, pin, persist the turn. Runs on the worker."""
        if job.cancelled.is_set():  # the client went away while the job waited for its turn
            return
        loaded = self.loaded
        store, namespace = self.store, self.namespace()
        if self._cache is None:
            self._cache = loaded.model.new_cache(batch_size=1, capacity=1024)
        cache = self._cache
        cache.reset()
        queued_s = time.perf_counter() - job.t_submit  # waiting for other asks: not this ask's latency
        # A stateless ask pins under an owner of its own while it runs (chunk caches it uses, pages it saves).
        owner = _pin_owner(job.session_id) if job.session_id else f"ask:{uuid.uuid4().hex}"
        try:
            done = self._generate(job, cache, self.reuse_setting(), owner)
        finally:
            if not job.session_id:
                store.unpin(owner)
        answer_ids, parts, finish = done.answer_ids, done.parts, done.finish
        if not finish:
            log.info("ask in session %s cancelled after %d tokens", job.session_id, len(answer_ids))
            return
        if finish == "repetition":  # keep one copy of the repeated text
            spelled = without_loop(answer_ids, done.period, loaded.tokenizer.decode)
            answer = loaded.tokenizer.decode(spelled)
        else:
            spelled = answer_ids[:-1] if finish == "eos" else answer_ids  # the end-of-turn token is the template's
            answer = "".join(parts)
        n_prompt = len(job.plan.prompt_ids)
        result_metrics = answer_metrics(
            prompt_tokens=n_prompt, reuse=done.restored.metrics(n_prompt), t_start=job.t_start,
            t_first=done.t_first, t_last=done.t_last, t_end=time.perf_counter(), queued_s=queued_s,
            n_new=len(answer_ids), prefill_ms=done.prefill_ms, finish=finish)
        result_metrics["ungrounded_terms"] = ungrounded_terms(answer, job.plan.sources, job.question)
        plan = job.plan
        if job.session_id:
            self._sessions.add_turn(job.session_id, job.question, answer, mode=job.mode, sources=plan.sources,
                                    metrics=result_metrics, left_out=plan.left_out, answer_ids=spelled,
                                    context=job.context)
        else:  # the client sends the answer back as text, the non-streamed one or the streamed deltas joined
            streamed = answer_ids[:-1] if finish == "eos" else answer_ids
            for text, ids in {answer: spelled, "".join(parts): streamed}.items():
                if loaded.tokenizer.decode(ids) == text:
                    self._spellings.record(namespace, text, ids, context=job.context)
        result = AskResult(answer=answer, session_id=job.session_id, sources=plan.sources, metrics=result_metrics,
                           left_out=plan.left_out, mode=job.mode, finish_reason=finish)
        job.events.put(AskEvent("done", job.session_id, sources=plan.sources, left_out=plan.left_out,
                                result=result))

    def _generate(self, job: _AskJob, cache: Any, setting: ReuseSetting, owner: str) -> _Generated:
        """Restore the prompt's cache (exact pages, or assembled from chunk caches), generate, save the new pages
        (pinned to `owner` for a session). Runs on the worker."""
        from tpa_core.generate import GenerationConfig, generate

        loaded = self.loaded
        store, namespace = self.store, self.namespace()
        prompt_ids = job.plan.prompt_ids
        # With chunk reuse, a retrieval ask also looks for the assembled pages of an earlier turn, even when its
        # own chunks could not be cut out of the prompt (spans empty): else a follow-up would reuse nothing.
        reuse = job.chunk_reuse if job.chunk_reuse is not None else reuse_pays_on(loaded.device)
        if reuse and job.mode == "retrieval":
            restored = restore_assembled(loaded.model, store, namespace, prompt_ids, cache, job.plan.spans, setting,
                                         owner)
        else:
            restored = restore_exact(store, namespace, prompt_ids, cache)
        config = GenerationConfig(max_new_tokens=job.max_new_tokens, temperature=job.temperature, top_p=job.top_p,
                                  seed=job.seed, stop_strings=job.stop, contrast=job.contrast)
        answer_ids: list[int] = []
        parts: list[str] = []
        t_first = t_last = 0.0
        prefill_ms = None
        finish = ""
        period = 0
        for event in generate(loaded.model, loaded.tokenizer, prompt_ids, config, cache=cache,
                              contrast_ids=job.plan.contrast_ids or None):
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
        if job.session_id:  # the session's pins: this prompt and answer, and the chunk caches they used
            store.unpin(owner)
            store.pin(store.prefix_keys(namespace, seen, extras=extras) + restored.chunk_keys, owner)
        store.save(namespace, seen, cache, boundaries=[b for b in job.plan.boundaries if b < len(seen)],
                   extras=extras)
        save_exact_lead(store, namespace, seen, cache, restored, job.plan.boundaries)
        return _Generated(restored, answer_ids, parts, finish, period, t_first, t_last, prefill_ms)

    # ----- context -----------------------------------------------------------------------------------------------
    def _retrieved_units(self, collection: str, question: str, top_k: int, hybrid: bool = False
                         ) -> list[ContextUnit]:
        hits = self.corpus.search(collection, question, k=top_k, hybrid=hybrid)[0]
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

    def retrieval_plan(self, top_k: int | None = None, context_tokens: int | None = None) -> RetrievalPlan:
        """How much context an ask gets: an explicit top-k wins (the argument's, then the settings'), then a context
        token budget (likewise), then the loaded model's default (app.retrieval_plan)."""
        k = top_k if top_k is not None else self.settings.top_k
        budget = context_tokens if context_tokens is not None else self.settings.context_tokens
        try:
            return choose_plan(self._n_params(), k, budget)
        except ValueError as exc:
            raise AppError(str(exc)) from None

    def _n_params(self) -> int:
        return sum(p.numel() for p in self.loaded.model.parameters())  # ~100 tensors: cheap per ask

    def _client_turns(self, history: Sequence[tuple[str, str]], collection: str) -> list[Turn]:
        """A stateless ask's earlier turns as the client sent them, each answer with its generated ids and the
        retrieval context it had where this service generated it (for this collection)."""
        found = self._spellings.find(self.namespace(), [answer for _, answer in history])
        turns = []
        for position, (question, answer) in enumerate(history):
            spelling = found.get(answer)
            context = spelling.context if spelling else []
            if any(unit.get("collection") != collection for unit in context):
                context = []
            turns.append(Turn(position=position, question=question, answer=answer, mode="retrieval",
                              answer_ids=spelling.token_ids if spelling else [], context=context))
        return turns

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
