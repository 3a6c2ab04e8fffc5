"""`POST /local/ask`: the route through which `tpa-rag ask` on this machine uses a running server.

The client side, the server file and the token are in `app.local_server`; this module is imported by the web
server only (it needs FastAPI).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.errors import user_error_types
from app.local_server import TOKEN_HEADER

if TYPE_CHECKING:
    from app.service import ChatService

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
_END = object()


def local_router(service: ChatService, token: str) -> APIRouter:
    """The route, answering as a local administrator (every session visible) to whoever holds `token`."""
    router = APIRouter()

    @router.post("/local/ask", include_in_schema=False)
    async def local_ask(request: Request) -> Any:
        given = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "not allowed"}, status_code=403)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return JSONResponse({"error": "request too large"}, status_code=413)
        try:
            args = json.loads(raw)
            options = service.options(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in args.get("options", {}).items() if v is not None})
            events = service.ask_stream(str(args["question"]), str(args["collection"]),
                                        str(args.get("session_id", "")), pinned=bool(args.get("pinned")),
                                        options=options)
            first = await anyio.to_thread.run_sync(next, events)  # user mistakes surface here, before output
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return JSONResponse({"error": f"malformed request: {exc}"}, status_code=400)
        except Exception as exc:  # user errors become 400s; anything else is logged
            if isinstance(exc, user_error_types()):
                return JSONResponse({"error": str(exc)}, status_code=400)
            log.exception("local ask failed")
            return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"},
                                status_code=500)
        return StreamingResponse(_stream(first, events), media_type="application/x-ndjson")

    return router


async def _stream(first: Any, events: Iterator) -> Any:
    yield _line(first)
    while True:
        event = await anyio.to_thread.run_sync(next, events, _END)
        if event is _END:
            return
        yield _line(event)


def _line(event: Any) -> bytes:
    """One event as a JSON line: start (session, left out), delta (text), done (the `ask --json` object, its
    sources with their citation numbers)."""
    if event.kind == "start":
        body = {"kind": "start", "session_id": event.session_id, "left_out": list(event.left_out)}
    elif event.kind == "delta":
        body = {"kind": "delta", "text": event.text}
    else:
        result = event.result.to_json()
        result["sources"] = [{**public, "ref": source.get("ref", number)} for number, (public, source)
                             in enumerate(zip(result["sources"], event.result.sources), start=1)]
        body = {"kind": "done", "result": result}
    return (json.dumps(body, ensure_ascii=False) + "\n").encode()
