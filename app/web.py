"""The web server: one FastAPI application with the Gradio page mounted at `/`, behind a Host allowlist.

Every route (the page, Gradio's API, and any API router added here) sits behind `HostAllowlist`, which refuses a
request whose Host header is not a name this server was started for. That stops DNS rebinding: a web page on
`attacker.example` that re-points its name at 127.0.0.1 still sends `Host: attacker.example`, and is refused.
`serve` runs the application with uvicorn (`serve_forever`); tests start it in a thread (`start_in_thread`).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.logins import LoginGuard
    from app.service import ChatService
    from app.settings import Settings

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
QUEUE_MAX_SIZE = 64
DEFAULT_CONCURRENCY = 4


def host_name(header: str) -> str | None:
    """The host part of a Host header value, lower-case, without port or trailing dot; None when malformed.

    `example.org:7860` -> `example.org`, `[::1]:7860` -> `::1`, `127.0.0.1` -> `127.0.0.1`."""
    value = header.strip().lower()
    if not value or any(c.isspace() or c in "/\\@?#" for c in value):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or (value[end + 1:] and not value[end + 1:].startswith(":")):
            return None
        name = value[1:end]
        port = value[end + 2:] if value[end + 1:] else ""
    else:
        name, _, port = value.partition(":")
        if ":" in port:
            return None  # an unbracketed IPv6 address or garbage
    if port and not port.isdigit():
        return None
    name = name.rstrip(".")
    return name or None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPolicy:
    """Which Host names a server answers to: the loopback names, the address it binds, and the extra names.

    A server bound to a wildcard address (0.0.0.0, ::) also answers to any IP-address Host: a literal address
    cannot be re-pointed by DNS, so it cannot carry a rebinding attack; names must be listed."""

    names: frozenset[str]
    any_ip: bool = False

    @classmethod
    def for_server(cls, bind_host: str, extra: Iterable[str] = ()) -> HostPolicy:
        names = {*LOOPBACK_NAMES}
        bind = (bind_host or "").strip().lower().strip("[]")
        if bind not in WILDCARD_ADDRESSES:
            names.add(bind.rstrip("."))
        for item in extra:
            name = host_name(item)
            if name:
                names.add(name)
        return cls(frozenset(names), any_ip=bind in WILDCARD_ADDRESSES)

    def allows(self, header: str | None) -> bool:
        name = host_name(header or "")
        if name is None:
            return False
        return name in self.names or (self.any_ip and _is_ip(name))


class HostAllowlist:
    """ASGI middleware: a request (HTTP or WebSocket) whose Host is not allowed gets 400 and reaches nothing."""

    def __init__(self, app: Any, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        hosts = [value for key, value in scope.get("headers", ()) if key == b"host"]
        header = hosts[0].decode("latin-1") if len(hosts) == 1 else None
        if self.policy.allows(header):
            await self.app(scope, receive, send)
            return
        log.warning("refused a request for Host %r (allowed: %s; --allowed-host adds a name)",
                    header, ", ".join(sorted(self.policy.names)))
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b"Invalid Host header: this server does not answer to that name.\n"
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class OwnerCookie:
    """ASGI middleware: a request without a valid owner cookie (`app.owners`) gets a fresh token, seen by the
    handlers of this very request (added to its Cookie header) and kept by the browser (Set-Cookie).

    A cross-site request (a link to the app followed from another site) never carries a SameSite=Strict cookie
    even when the browser has one, so it gets no Set-Cookie: that would replace the browser's token and lose its
    sessions. The page's own requests that follow are same-origin and carry the cookie."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.requests import cookie_parser

        from app import owners

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = b"; ".join(value for key, value in scope.get("headers", ()) if key == b"cookie").decode("latin-1")
        if owners.valid_token(cookie_parser(raw).get(owners.OWNER_COOKIE)):
            await self.app(scope, receive, send)
            return
        token = owners.new_token()
        cookie = f"{raw}; {owners.OWNER_COOKIE}={token}" if raw else f"{owners.OWNER_COOKIE}={token}"
        headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"cookie"]
        cross_site = (b"sec-fetch-site", b"cross-site") in headers
        scope = dict(scope, headers=[*headers, (b"cookie", cookie.encode("latin-1"))])

        async def send_with_cookie(message: dict) -> None:
            if message["type"] == "http.response.start" and not cross_site:
                extra = (b"set-cookie", owners.set_cookie_value(token).encode("latin-1"))
                message = dict(message, headers=[*message.get("headers", ()), extra])
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def build_web_app(service: ChatService, settings: Settings, *, host: str = "127.0.0.1", port: int = 7860,
                  auth: list[tuple[str, str]] | LoginGuard | None = None, local_token: str | None = None,
                  api_options: dict[str, Any] | None = None) -> FastAPI:
    """The whole server as one ASGI application: API routers, then the Gradio page at `/`, all behind the
    Host allowlist (`settings.allowed_hosts` adds names to the loopback names and `host`). `auth`: the users
    (their failed logins are throttled by a `LoginGuard`), or a guard. With `local_token`, `tpa-rag ask` on this
    machine may answer through the server (`app.local_server`). `api_options`: keyword arguments of
    `app.openai_api.openai_router` (its limits)."""
    import gradio as gr
    from fastapi import FastAPI

    from app import ui
    from app.logins import LoginGuard

    guard = LoginGuard(auth) if isinstance(auth, list) else auth
    from app.openai_api import openai_router

    if host not in LOOPBACK_NAMES and not auth:
        log.warning("serving on %s without --auth: anyone who can reach this address can use the app", host)
    web = FastAPI(title="tpa-rag", docs_url=None, redoc_url=None, openapi_url=None)
    web.add_middleware(OwnerCookie)
    web.add_middleware(HostAllowlist, policy=HostPolicy.for_server(host, settings.allowed_hosts))  # outermost
    # API routers are included here, above the page: the mount at `/` takes every path that reaches it.
    web.include_router(openai_router(service, settings, **(api_options or {})))
    if local_token:
        from app.local_api import local_router

        web.include_router(local_router(service, local_token))
    demo = ui.build_app(service)
    demo.queue(default_concurrency_limit=DEFAULT_CONCURRENCY, max_size=QUEUE_MAX_SIZE)
    gr.mount_gradio_app(
        web, demo, path="/", server_name=host, server_port=port, auth=guard.check if guard else None,
        max_file_size=service.max_upload_bytes, allowed_paths=[], show_error=True,
        theme=gr.themes.Soft(), css=ui.CSS, footer_links=["api"], ssr_mode=False,
    )
    return web


def _uvicorn_config(web: FastAPI, host: str, port: int, grace_s: float = 5.0):
    import uvicorn

    return uvicorn.Config(web, host=host, port=port, log_level="warning", lifespan="on",
                          proxy_headers=False, server_header=False, timeout_graceful_shutdown=grace_s)


def serve_forever(web: FastAPI, *, host: str, port: int) -> None:
    """Run `web` on host:port until Ctrl+C."""
    import uvicorn

    from app.errors import AppError

    server = uvicorn.Server(_uvicorn_config(web, host, port))
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        if server.started:
            raise
    if not server.started:
        raise AppError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")


class BackgroundServer:
    """`web` served by uvicorn in a daemon thread (tests, embedding). `url` is where it listens; `stop()`."""

    def __init__(self, web: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self._server = uvicorn.Server(_uvicorn_config(web, host, port, grace_s=1.0))
        self._thread = threading.Thread(target=self._server.run, name="tpa-rag-web", daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the web server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        sockets = [s for server in self._server.servers for s in server.sockets]
        self.port = sockets[0].getsockname()[1] if sockets else self.port
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def start_in_thread(web: FastAPI, host: str = "127.0.0.1", port: int = 0) -> BackgroundServer:
    """Serve `web` in a background thread and return once it listens (port 0: a free port)."""
    return BackgroundServer(web, host, port).start()
