"""The app's one SQLAlchemy engine: SQLite (WAL, busy timeout) by default, PostgreSQL given a URL.

The store, the corpus and the sessions each own their tables; they all receive the engine made here.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from app.errors import AppError

SQLITE_BUSY_TIMEOUT_MS = 30_000
SUPPORTED_BACKENDS = ("sqlite", "postgresql")


class DatabaseURLError(AppError):
    """A database URL that is malformed or names a database tpa-rag does not support."""


def check_url(url: str) -> None:
    """Refuse a malformed URL or one for another database (the message never repeats a password)."""
    try:
        backend = make_url(url).get_backend_name()
    except (ArgumentError, ValueError):
        raise DatabaseURLError("TPA_RAG_DATABASE_URL is not a database URL; leave it empty for SQLite in the data "
                               "folder, or give postgresql://USER:PASSWORD@HOST:PORT/DATABASE") from None
    if backend not in SUPPORTED_BACKENDS:
        raise DatabaseURLError(f"TPA_RAG_DATABASE_URL names a {backend!r} database; tpa-rag keeps its data in "
                               "SQLite (leave it empty) or PostgreSQL (postgresql://...)")


def make_engine(url: str) -> Engine:
    """Create an engine for `url`. SQLite gets WAL, a busy timeout and foreign keys on every connection."""
    check_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # DB-API objects are untyped
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True)
