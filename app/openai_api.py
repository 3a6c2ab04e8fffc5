"""An OpenAI-compatible API under `/v1`, beside the web app: `openai_router(service, settings)`.

- `GET /v1/models`: the loaded model by its name, and `rag:<collection>` and `pinned:<collection>` for each
  collection.
- `POST /v1/chat/completions`, streamed (server-sent events) or not. The model's own name is a plain chat over the
  client's messages; `rag:<collection>` answers the last user message from the collection (retrieval, numbered
  context, `[n]` citations), the earlier messages being the conversation so far, and adds the cited `sources` to the
  response (and to the final stream chunk); `pinned:<collection>` does the same with the collection's whole
  documents as the context (the app's pinned mode). All go through the service's restore -> prefill the rest -> save
  path, so a client that resends a growing conversation reuses its cached prefix
  (`usage.prompt_tokens_details.cached_tokens`), after a restart too.
- `POST /v1/embeddings` with the collections' embedding model.

Access: with API keys configured, every `/v1` request needs `Authorization: Bearer <key>`. Generation goes through
the service's one model worker: requests are handed to it in order of arrival, and past `max_pending` requests in
flight a request is refused at once with 503 and `Retry-After`. A stream starts as soon as its request is checked
and queued, with SSE comments while it waits its turn (so that proxies and clients do not time it out). Every error
is answered in OpenAI's shape (`app.openai_schema.OpenAIError`), never with a stack trace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from app.errors import AppError
from app.openai_schema import (
    FINISH_REASONS,
    PINNED_PREFIX,
    RAG_PREFIX,
    ChatRequest,
    OpenAIError,
    chunk_body,
    completion_body,
    completion_id,
    embedding_body,
    parse_chat_request,
    parse_embedding_request,
    sse,
    usage,
)

if TYPE_CHECKING:
    from app.service import AskEvent, ChatService
    from app.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024**2
DEFAULT_MAX_PENDING = 8
RETRY_AFTER_S = 2
MIN_KEY_CHARS = 16


def parse_api_keys(value: str | None) -> tuple[str, ...]:
    """`--api-key`: a key, or the path of a file with one key per line (blank lines and # comments)."""
    if not value:
        return ()
    path = Path(value).expanduser()
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else [value]
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise AppError(f"no API keys in {path}")
    return check_api_keys(keys)


def check_api_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
    for key in keys:
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise AppError(f"an API key must be at least {MIN_KEY_CHARS} characters without spaces (got one of "
                           f"{len(key)}); make one with: "
                           "python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
    return keys


class _Admission:
    """Counts the requests in flight; past the limit a request is refused (503) instead of queued."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, int(limit))
        self._lock = threading.Lock()
        self._count = 0

    def enter(self) -> None:
        with self._lock:
            if self._count >= self.limit:
                raise OpenAIError(503, f"the server is busy ({self._count} requests in flight, the limit is "
                                       f"{self.limit}); retry in a few seconds", code="server_busy",
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
            self._count += 1

    def leave(self) -> None:
        with self._lock:
            self._count -= 1


def _user_errors() -> tuple[type[BaseException], ...]:
    from retrieval.errors import RetrievalError
    from tpa_core.errors import TPAError

    return (AppError, TPAError, RetrievalError)


def _as_openai_error(exc: BaseException) -> OpenAIError:
    """A service error as a 400 (a context overflow with OpenAI's code); anything else as a bare 500."""
    from app.context import ContextOverflowError

    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return OpenAIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, _user_errors()):
        return OpenAIError(400, str(exc))
    log.error("OpenAI API request failed", exc_info=exc)
    return OpenAIError(500, f"internal error ({type(exc).__name__}); the server log has the details")


def _error_response(exc: OpenAIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _next(events: Iterator[AskEvent]) -> AskEvent | None:
    return next(events, None)


class _OpenAIApi:
    """The endpoints' state: the service, the keys, the admission count and the arrival-order lock."""

    def __init__(self, service: ChatService, keys: tuple[str, ...], max_body_bytes: int, max_pending: int) -> None:
        self.service = service
        self.keys = tuple(k.encode() for k in keys)
        self.max_body_bytes = int(max_body_bytes)
        self.admission = _Admission(max_pending)
        self.started = int(time.time())
        # Held while a request is prepared and queued: jobs reach the model worker in the order their requests
        # arrived (asyncio locks wake their waiters first come, first served).
        self.arrival = asyncio.Lock()

    # ----- access and input --------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if not self.keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        token = given.strip().encode()
        # compare_digest against every key: the time taken does not tell which prefix matched
        if scheme.lower() != "bearer" or not sum(hmac.compare_digest(token, key) for key in self.keys):
            raise OpenAIError(401, "a valid API key is required: send 'Authorization: Bearer <key>' with one of "
                                   "the keys the server was started with", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})

    async def body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = OpenAIError(413, f"the request body is over the limit of {limit:,} bytes",
                              code="request_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            parts.append(chunk)
        return b"".join(parts)

    def fingerprint(self) -> str:
        return f"fp_{self.service.namespace()[:12]}"

    def model_names(self) -> tuple[str, list[str]]:
        names = self.service.collection_names()
        return self.service.model_name, [prefix + name for prefix in (RAG_PREFIX, PINNED_PREFIX) for name in names]

    def check_model(self, name: str) -> None:
        chat_model, collections = self.model_names()
        if name != chat_model and name not in collections:
            raise OpenAIError(404, f"the model {name!r} does not exist; this server has {chat_model!r} (a plain "
                                   f"chat), 'rag:<collection>' and 'pinned:<collection>' (GET /v1/models lists them)",
                              param="model", code="model_not_found")

    # ----- endpoints -------------------------------------------------------------------------------------------
    async def list_models(self) -> dict:
        chat_model, collections = await run_in_threadpool(self.model_names)
        return {"object": "list", "data": [self._model(name) for name in [chat_model, *collections]]}

    async def get_model(self, model_id: str) -> dict:
        await run_in_threadpool(self.check_model, model_id)
        return self._model(model_id)

    def _model(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "tpa-rag"}

    async def not_found(self, request: Request) -> None:
        raise OpenAIError(404, f"no such endpoint: {request.method} {request.url.path} (this server has GET "
                               "/v1/models, POST /v1/chat/completions and POST /v1/embeddings)",
                          code="unknown_url")

    async def chat_completions(self, request: Request) -> Any:
        chat = parse_chat_request(await self.body(request))
        await run_in_threadpool(self.check_model, chat.model)
        self.admission.enter()
        events: Iterator[AskEvent] | None = None
        try:
            async with self.arrival:
                events = await run_in_threadpool(self._start, chat)
                await run_in_threadpool(_next, events)  # the start event: the job is queued for the worker
        except BaseException:
            if events is not None:
                with anyio.CancelScope(shield=True):
                    await run_in_threadpool(events.close)
            self.admission.leave()
            raise
        fingerprint = await run_in_threadpool(self.fingerprint)
        if chat.stream:
            async def close() -> None:  # a client that went away stops the generation
                await run_in_threadpool(events.close)
                self.admission.leave()

            return _EventStream(self._stream(chat, events, fingerprint), on_close=close)
        try:
            result = await run_in_threadpool(_finish, events)
        finally:
            self.admission.leave()
        body = completion_body(completion_id(), chat.model, fingerprint, result, chat.collection is not None)
        return JSONResponse(body)

    def _start(self, chat: ChatRequest) -> Iterator[AskEvent]:
        """The service's event stream for `chat` (raises for what the service refuses: too long, no room...)."""
        options = self.service.options(max_new_tokens=chat.max_tokens, temperature=chat.temperature,
                                       top_p=chat.top_p, seed=chat.seed, stop=chat.stop)
        collection = chat.collection
        if collection is None:
            return self.service.chat_stream(chat.messages, options)
        messages = chat.messages
        if messages[-1]["role"] != "user":
            raise OpenAIError(400, f"messages[{len(messages) - 1}]: the last message of a collection chat must "
                                   "be the user's question", param=f"messages[{len(messages) - 1}].role",
                              code="invalid_value")
        instructions = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
        options = dataclasses.replace(options, instructions=instructions)
        return self.service.ask_stream(messages[-1]["content"], collection, pinned=chat.pinned, options=options,
                                       history=_history(messages[:-1]))

    async def _stream(self, chat: ChatRequest, events: Iterator[AskEvent], fingerprint: str
                      ) -> AsyncIterator[bytes]:
        cid, created = completion_id(), int(time.time())

        def chunk(**fields: Any) -> bytes:
            return sse(chunk_body(cid, chat.model, fingerprint, created, **fields))

        try:
            yield chunk(delta={"role": "assistant", "content": ""})
            event = await anyio.to_thread.run_sync(_next, events)
            while event is not None:
                if event.kind == "waiting":
                    yield b": waiting for the model\n\n"
                elif event.kind == "delta" and event.text:
                    yield chunk(delta={"content": event.text})
                elif event.kind == "done":
                    result = event.result
                    rag = chat.collection is not None
                    yield chunk(finish_reason=FINISH_REASONS.get(result.finish_reason, "stop"),
                                sources=result.sources if rag else None, left_out=result.left_out if rag else None)
                    if chat.include_usage:
                        yield chunk(usage_body=usage(result.metrics))
                event = await anyio.to_thread.run_sync(_next, events)
            yield sse("[DONE]")
        except Exception as exc:  # noqa: BLE001 - the status line is sent: the error goes into the stream
            yield sse(_as_openai_error(exc).body())
            yield sse("[DONE]")

    async def embeddings(self, request: Request) -> dict:
        req = parse_embedding_request(await self.body(request))
        self.admission.enter()
        try:
            return await run_in_threadpool(self._embed, req)
        finally:
            self.admission.leave()

    def _embed(self, req: Any) -> dict:
        embedder = self.service.corpus.embedder
        name = embedder.name
        accepted = {name, name.rsplit("/", 1)[-1]}
        if req.model not in accepted:
            raise OpenAIError(404, f"the embedding model {req.model!r} does not exist; this server embeds with "
                                   f"{name!r}", param="model", code="model_not_found")
        if req.dimensions is not None and req.dimensions != embedder.dim:
            raise OpenAIError(400, f"dimensions={req.dimensions}: {name} gives {embedder.dim} dimensions only",
                              param="dimensions", code="unsupported_value")
        counts = embedder.count_tokens(req.inputs)
        limit = getattr(embedder, "max_tokens", None)
        for index, count in enumerate(counts):
            if limit and count > limit:
                raise OpenAIError(400, f"input[{index}] has {count} tokens; {name} reads at most {limit} (split "
                                       "the text)", param=f"input[{index}]", code="context_length_exceeded")
        vectors = embedder.embed(req.inputs)
        return embedding_body(req.model, vectors, req.encoding_format, sum(counts))


class _EventStream(StreamingResponse):
    """A server-sent event stream that runs `on_close` however it ends: finished, failed, or the client gone
    (even before the first event: an async generator never started would never run its own `finally`)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


def _finish(events: Iterator[AskEvent]) -> Any:
    """Drain the events to the "done" event's result."""
    event = _next(events)
    while event is not None:
        if event.kind == "done":
            return event.result
        event = _next(events)
    raise AppError("the answer was cancelled before it finished")


def _history(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(question, answer) turns of a conversation: each assistant message with the user messages before it
    (system messages are the caller's instructions, not turns)."""
    turns: list[tuple[str, str]] = []
    asked: list[str] = []
    for message in messages:
        if message["role"] == "user":
            asked.append(message["content"])
        elif message["role"] == "assistant":
            turns.append(("\n\n".join(asked), message["content"]))
            asked = []
    return turns


def openai_router(service: ChatService, settings: Settings, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                  max_pending: int = DEFAULT_MAX_PENDING) -> APIRouter:
    """The `/v1` routes for `service`; keys from `settings.api_keys` (none: open, for a loopback address)."""
    api = _OpenAIApi(service, tuple(settings.api_keys), max_body_bytes, max_pending)

    class OpenAIRoute(APIRoute):
        """Answers OpenAIError (and anything unexpected) in OpenAI's shape."""

        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def run(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:  # noqa: BLE001 - answered as an OpenAI error; unexpected ones logged
                    return _error_response(_as_openai_error(exc))

            return run

    router = APIRouter(prefix="/v1", route_class=OpenAIRoute, dependencies=[Depends(api.authorize)])
    router.add_api_route("/models", api.list_models, methods=["GET"])
    router.add_api_route("/models/{model_id:path}", api.get_model, methods=["GET"])
    router.add_api_route("/chat/completions", api.chat_completions, methods=["POST"])
    router.add_api_route("/embeddings", api.embeddings, methods=["POST"])
    router.add_api_route("/{rest:path}", api.not_found,
                         methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    return router
