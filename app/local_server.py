"""`tpa-rag ask` through a server already running on the same data folder, instead of loading the model again.

A running `serve` writes `<data dir>/server.json` (mode 0600): its loopback URL, its process id, the model it
runs and a random token. `ask` reads it, and if that process is alive, runs the same model and answers on the
loopback address, it streams the answer from `POST /local/ask` (`app.local_api`; newline-delimited JSON events),
authenticated by the token: whoever can read the data folder can read everything in it anyway, and nobody else
gets the token.
The server answers as the CLI would (a local administrator: every session is visible). Any failure to reach it
falls back to answering in-process; `ask --no-server` or `TPA_RAG_USE_SERVER=0` never tries.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.errors import AppError
from tpa_core.store.reconcile import process_exists

log = logging.getLogger(__name__)

SERVER_FILE = "server.json"
TOKEN_HEADER = "x-tpa-rag-local-token"
CONNECT_TIMEOUT_S = 2.0


class ServerUnavailable(Exception):
    """The server named in server.json could not be used; the caller answers in-process instead."""


@dataclass(frozen=True)
class LocalServer:
    url: str  # http://127.0.0.1:PORT/
    pid: int
    model: str
    token: str


def new_token() -> str:
    return secrets.token_hex(32)


def write_server_file(data_dir: Path, server: LocalServer) -> Path:
    """Write server.json atomically, readable by this user only."""
    path = Path(data_dir) / SERVER_FILE
    temp = path.with_name(f".{SERVER_FILE}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump({"url": server.url, "pid": server.pid, "model": server.model, "token": server.token}, out)
    os.replace(temp, path)
    return path


def remove_server_file(data_dir: Path, server: LocalServer) -> None:
    """Remove server.json if it is still this server's (a newer server may have replaced it)."""
    found = _read(Path(data_dir) / SERVER_FILE)
    if found is not None and found.token == server.token:
        (Path(data_dir) / SERVER_FILE).unlink(missing_ok=True)


def _read(path: Path) -> LocalServer | None:
    try:
        info = path.lstat()
        if not path.is_file() or path.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
            return None  # only a private file of this user's is trusted
        data = json.loads(path.read_text(encoding="utf-8"))
        return LocalServer(str(data["url"]), int(data["pid"]), str(data["model"]), str(data["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_server(data_dir: Path, model: str) -> LocalServer | None:
    """The live server on `data_dir` that runs `model`, or None."""
    server = _read(Path(data_dir) / SERVER_FILE)
    if server is None or not process_exists(server.pid) or server.model != model:
        return None
    if not server.url.startswith(("http://127.0.0.1:", "http://[::1]:", "http://localhost:")):
        return None
    return server


# ----- the client (the CLI) -----------------------------------------------------------------------------------------
def ask_via_server(server: LocalServer, request: dict) -> Iterator[dict]:
    """Stream the events of one ask from `server`: {"kind": "start" | "delta" | "done", ...}.

    Raises ServerUnavailable when the server cannot be used (nothing was asked), AppError for a user mistake
    the server refused (the same message the in-process ask gives)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(server.url)
    body = json.dumps(request).encode()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=CONNECT_TIMEOUT_S)
    try:
        conn.request("POST", "/local/ask", body=body, headers={
            "content-type": "application/json", TOKEN_HEADER: server.token, "host": f"127.0.0.1:{parts.port}"})
        conn.sock.settimeout(None)  # an answer may take minutes on a small CPU
        response = conn.getresponse()
    except OSError as exc:
        conn.close()
        raise ServerUnavailable(f"no answer from {server.url} ({exc})") from None
    try:
        if response.status == 400:
            raise AppError(json.loads(response.read() or b"{}").get("error", "the server refused the question"))
        if response.status != 200:
            raise ServerUnavailable(f"{server.url} answered HTTP {response.status}")
        for line in response:
            if line.strip():
                event = json.loads(line)
                if event.get("kind") == "error":
                    raise AppError(event.get("message", "the server could not answer"))
                yield event
    finally:
        conn.close()
