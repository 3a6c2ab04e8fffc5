"""Chat sessions and their turns, persisted in the app's database (SQLAlchemy 2, SQLite or PostgreSQL).

A session belongs to one collection; each turn keeps the question, the answer, the sources shown with it and the
metrics of its generation, so a session can be listed, resumed after a restart, renamed and deleted. The tables
are created on the engine given to `SessionStore` (never at import). Callers get plain frozen dataclasses, never
ORM objects, so nothing here leaks a database session.

Every session has an owner (see `app.owners`): a web visitor lists, reads, continues, renames and deletes only
their own sessions, and an id that is not theirs is answered exactly like an id that does not exist. `owner=None`
in a call means the local administrator (the CLI), who sees every session; sessions the CLI creates, and those
from before owners existed, are owned by nobody (NULL) and so are visible to the CLI only.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import JSON, DateTime, Engine, ForeignKey, Integer, String, Text, func, inspect, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from app.errors import AppError

MAX_SESSION_NAME_CHARS = 200
MAX_OWNER_CHARS = 200


class UnknownSessionError(AppError):
    """A session id that does not exist (never created, deleted) or belongs to someone else: the same answer."""


class _Base(DeclarativeBase):
    pass


class _SessionRow(_Base):
    __tablename__ = "app_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_SESSION_NAME_CHARS), default="")
    collection: Mapped[str] = mapped_column(String(200), index=True)
    owner: Mapped[str | None] = mapped_column(String(MAX_OWNER_CHARS), nullable=True, index=True)
    pinned_documents: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    turns: Mapped[list[_TurnRow]] = relationship(
        back_populates="session", cascade="all, delete-orphan", passive_deletes=True, order_by="_TurnRow.position"
    )


class _TurnRow(_Base):
    __tablename__ = "app_turns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("app_sessions.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    # The answer's token ids as generated (no end-of-turn token): the next prompt of the session uses them
    # instead of re-tokenizing the text, so its prefix is token for token what the cache holds.
    answer_ids: Mapped[list] = mapped_column(JSON, default=list)
    mode: Mapped[str] = mapped_column(String(16), default="retrieval")
    sources: Mapped[list] = mapped_column(JSON, default=list)
    # The retrieval context as the prompt had it (ContextUnit.to_dict each): the next question keeps it in place.
    context: Mapped[list] = mapped_column(JSON, default=list)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    left_out: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    session: Mapped[_SessionRow] = relationship(back_populates="turns")


@dataclass(frozen=True)
class Turn:
    """One question and its answer, with the sources shown and the generation metrics."""

    position: int
    question: str
    answer: str
    mode: str
    sources: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    answer_ids: list[int] = field(default_factory=list)
    context: list[dict] = field(default_factory=list)
    created_at: datetime | None = None


@dataclass(frozen=True)
class SessionInfo:
    """A chat session as listed: its id, name, collection, pinned document selection and turn count."""

    id: str
    name: str
    collection: str
    pinned_documents: list[str]
    created_at: datetime
    updated_at: datetime
    n_turns: int
    owner: str | None = None  # see app.owners; None: nobody's (the CLI's)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "collection": self.collection,
            "pinned_documents": list(self.pinned_documents),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "turns": self.n_turns,
            "owner": self.owner,
        }


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _info(row: _SessionRow, n_turns: int) -> SessionInfo:
    return SessionInfo(
        id=row.id,
        name=row.name,
        collection=row.collection,
        pinned_documents=list(row.pinned_documents or []),
        created_at=row.created_at,
        updated_at=row.updated_at,
        n_turns=n_turns,
        owner=row.owner,
    )


def _turn(row: _TurnRow) -> Turn:
    return Turn(
        position=row.position,
        question=row.question,
        answer=row.answer,
        mode=row.mode,
        sources=list(row.sources or []),
        metrics=dict(row.metrics or {}),
        left_out=list(row.left_out or []),
        answer_ids=list(row.answer_ids or []),
        context=list(row.context or []),
        created_at=row.created_at,
    )


def _clean_name(name: str) -> str:
    name = " ".join(name.split())
    if len(name) > MAX_SESSION_NAME_CHARS:
        raise AppError(f"session name too long ({len(name)} characters, at most {MAX_SESSION_NAME_CHARS})")
    return name


def _add_owner_column(engine: Engine) -> None:
    """Migrate a database made before sessions had owners: add the NULL-able `owner` column and its index.

    Old sessions stay owned by nobody: which visitor made them was never recorded, and showing them to every
    visitor is what owners are for. Replicas may race here; the loser's ALTER fails and the column is there."""
    if "owner" in {c["name"] for c in inspect(engine).get_columns(_SessionRow.__tablename__)}:
        return
    try:
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE {_SessionRow.__tablename__} "
                              f"ADD COLUMN owner VARCHAR({MAX_OWNER_CHARS})"))
    except DBAPIError:
        if "owner" not in {c["name"] for c in inspect(engine).get_columns(_SessionRow.__tablename__)}:
            raise
    index = next(i for i in _SessionRow.__table__.indexes if list(i.columns.keys()) == ["owner"])
    index.create(engine, checkfirst=True)


class SessionStore:
    """Sessions and turns in the app's database. Safe to share between threads (one DB session per call)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        _Base.metadata.create_all(engine)
        _add_owner_column(engine)

    def _row(self, db: Session, session_id: str, owner: str | None) -> _SessionRow:
        """The session `session_id` if `owner` may see it (None: the administrator sees all)."""
        row = db.get(_SessionRow, session_id) if session_id else None
        if row is None or (owner is not None and row.owner != owner):
            raise UnknownSessionError(f"no such session {session_id!r}")
        return row

    def _count(self, db: Session, session_id: str) -> int:
        return int(db.scalar(select(func.count(_TurnRow.id)).where(_TurnRow.session_id == session_id)) or 0)

    def create(self, collection: str, name: str = "", pinned_documents: Sequence[str] = (),
               owner: str | None = None) -> SessionInfo:
        """A new, empty session on `collection` owned by `owner` (None: nobody, the CLI's); its id is a random
        128-bit hex string."""
        if owner is not None and not 0 < len(owner) <= MAX_OWNER_CHARS:
            raise ValueError(f"an owner is 1 to {MAX_OWNER_CHARS} characters")
        now = _now()
        row = _SessionRow(
            id=uuid.uuid4().hex,
            name=_clean_name(name),
            collection=collection,
            owner=owner,
            pinned_documents=list(pinned_documents),
            created_at=now,
            updated_at=now,
        )
        with Session(self._engine) as db, db.begin():
            db.add(row)
            db.flush()
            return _info(row, 0)

    def get(self, session_id: str, owner: str | None = None) -> SessionInfo:
        with Session(self._engine) as db:
            row = self._row(db, session_id, owner)
            return _info(row, self._count(db, session_id))

    def list(self, collection: str | None = None, owner: str | None = None) -> list[SessionInfo]:
        """`owner`'s sessions (None: everyone's), the most recently used first (optionally of one collection)."""
        counts = (
            select(_TurnRow.session_id, func.count(_TurnRow.id).label("n")).group_by(_TurnRow.session_id).subquery()
        )
        query = (
            select(_SessionRow, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.session_id == _SessionRow.id)
            .order_by(_SessionRow.updated_at.desc(), _SessionRow.id)
        )
        if collection is not None:
            query = query.where(_SessionRow.collection == collection)
        if owner is not None:
            query = query.where(_SessionRow.owner == owner)
        with Session(self._engine) as db:
            return [_info(row, int(n)) for row, n in db.execute(query).all()]

    def turns(self, session_id: str, owner: str | None = None) -> list[Turn]:
        """The session's turns in order; raises UnknownSessionError for an unknown (or foreign) id."""
        with Session(self._engine) as db:
            row = self._row(db, session_id, owner)
            return [_turn(t) for t in row.turns]

    def rename(self, session_id: str, name: str, owner: str | None = None) -> SessionInfo:
        with Session(self._engine) as db, db.begin():
            row = self._row(db, session_id, owner)
            row.name = _clean_name(name)
            return _info(row, self._count(db, session_id))

    def set_pinned_documents(self, session_id: str, paths: Sequence[str], owner: str | None = None) -> SessionInfo:
        with Session(self._engine) as db, db.begin():
            row = self._row(db, session_id, owner)
            row.pinned_documents = list(paths)
            return _info(row, self._count(db, session_id))

    def add_turn(
        self,
        session_id: str,
        question: str,
        answer: str,
        *,
        mode: str,
        sources: Sequence[dict],
        metrics: dict,
        left_out: Sequence[str] = (),
        answer_ids: Sequence[int] = (),
        context: Sequence[dict] = (),
    ) -> Turn:
        """Append a turn (in one transaction with the session's `updated_at`)."""
        now = _now()
        with Session(self._engine) as db, db.begin():
            row = self._row(db, session_id, None)  # the caller checked the owner when the ask began
            position = self._count(db, session_id)
            turn = _TurnRow(
                session_id=session_id,
                position=position,
                question=question,
                answer=answer,
                mode=mode,
                sources=list(sources),
                metrics=dict(metrics),
                left_out=list(left_out),
                answer_ids=[int(t) for t in answer_ids],
                context=list(context),
                created_at=now,
            )
            db.add(turn)
            row.updated_at = now
            if not row.name:
                row.name = _clean_name(question[:60])
            db.flush()
            return _turn(turn)

    def delete(self, session_id: str, owner: str | None = None) -> SessionInfo:
        """Delete the session and its turns; returns what it was (its cache pins are the caller's to release)."""
        with Session(self._engine) as db, db.begin():
            row = self._row(db, session_id, owner)
            info = _info(row, self._count(db, session_id))
            db.delete(row)
            return info
