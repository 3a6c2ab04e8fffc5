"""The store's tables (SQLAlchemy 2.x, own DeclarativeBase). Created on the engine the store is opened with,
never at import. Times are Unix seconds (float), the same on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Engine, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

KEY = String(64)  # sha256 as hex

# Entry.state
PENDING = "pending"  # a writer has claimed the key; the blob may be absent, partial or unrenamed
READY = "ready"  # the blob is complete, fsynced and renamed into place


class StoreBase(DeclarativeBase):
    """Declarative base of the store's tables only (the corpus and the sessions have their own)."""


class Namespace(StoreBase):
    """One (model fingerprint, factor dtype, RoPE settings, format version) combination."""

    __tablename__ = "store_namespaces"

    key: Mapped[str] = mapped_column(KEY, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(256))
    dtype: Mapped[str] = mapped_column(String(32))
    rope: Mapped[str] = mapped_column(Text)  # canonical JSON
    format_version: Mapped[int] = mapped_column(Integer)
    # {"layers.{i}.{name}": [dtype, [per-token shape]]}: what every page of this namespace must hold. Set by the
    # first save; checked for every page before it is loaded.
    layout: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[float] = mapped_column(Float)


class Entry(StoreBase):
    """One page (or tail) of a prefix: a blob file plus its bookkeeping."""

    __tablename__ = "store_entries"

    key: Mapped[str] = mapped_column(KEY, primary_key=True)
    namespace: Mapped[str] = mapped_column(KEY, ForeignKey("store_namespaces.key", ondelete="CASCADE"))
    parent: Mapped[str | None] = mapped_column(KEY, nullable=True)  # previous page's key; None for the first
    kind: Mapped[str] = mapped_column(String(8))  # "page" | "tail"
    start: Mapped[int] = mapped_column(Integer)  # position of the page's first token
    n_tokens: Mapped[int] = mapped_column(Integer)
    nbytes: Mapped[int] = mapped_column(BigInteger)  # size of the blob file
    path: Mapped[str] = mapped_column(String(512))  # relative to the blobs folder
    # "<algorithm>:<hex digest>" of the blob file's bytes (set when the entry becomes ready). The column keeps its
    # first name so that databases made by earlier versions open unchanged.
    checksum: Mapped[str] = mapped_column("sha256", KEY)
    state: Mapped[str] = mapped_column(String(12))  # PENDING | READY
    writer: Mapped[str | None] = mapped_column(String(200), nullable=True)  # "host:pid:start" while pending
    created: Mapped[float] = mapped_column(Float)
    last_access: Mapped[float] = mapped_column(Float)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)  # some link holds it; kept in step with links
    anchored: Mapped[bool] = mapped_column(Boolean, default=False)  # a tail saved at a boundary: never replaced

    __table_args__ = (
        Index("ix_store_entries_parent", "parent"),
        Index("ix_store_entries_ns_state", "namespace", "state"),
        Index("ix_store_entries_access", "last_access"),
    )


class Link(StoreBase):
    """An owner (a session, a document, a pinned context) holding an entry: pinned entries are never evicted.
    No foreign key on purpose: a link outlives a quarantined page and holds the page that replaces it."""

    __tablename__ = "store_links"

    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(KEY, primary_key=True)

    __table_args__ = (Index("ix_store_links_key", "key"),)


class Quarantined(StoreBase):
    """A page that failed verification; its file is kept under quarantine/ for inspection until `gc`."""

    __tablename__ = "store_quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(KEY)
    namespace: Mapped[str] = mapped_column(KEY)
    path: Mapped[str | None] = mapped_column(String(512), nullable=True)  # relative to the blobs folder
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[float] = mapped_column(Float)


class Counter(StoreBase):
    """Persistent lookup counters (one row per name), so the hit rate survives restarts."""

    __tablename__ = "store_counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


COUNTERS = ("hits", "misses", "tokens_reused", "tokens_requested", "pages_written", "rejected", "evicted")


def create_tables(engine: Engine) -> None:
    """Create the store's tables on `engine` where they are missing (safe to call from several processes)."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    try:
        StoreBase.metadata.create_all(engine)
    except (IntegrityError, OperationalError, ProgrammingError):
        # Two processes opening a fresh database at once: the loser's CREATE collides; the tables now exist.
        StoreBase.metadata.create_all(engine)
