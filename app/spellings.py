"""The token ids of answers the model generated, found again by their text.

A client of the OpenAI-compatible API sends the whole conversation with every request, our earlier answers as
plain text. Re-tokenizing such a text does not always give back the ids the model generated (see `app.tokens`),
and the factor cache holds the generated ids: so every answer we generate is recorded here, keyed by a hash of
the model namespace and the exact text, and the next prompt spells it with those ids. A text we did not
generate (or one the client changed) has no record and is tokenized like the rest of the prompt; the cached
prefix then ends near where that text begins.

An answer of a collection chat also records the retrieval context its prompt had, so a follow-up keeps that
context in place as the web app's sessions do. The table is bounded: past `max_rows` the least recently used
records go.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import JSON, Engine, Float, String, delete, func, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

DEFAULT_MAX_ROWS = 20_000


class _Base(DeclarativeBase):
    pass


class _SpellingRow(_Base):
    __tablename__ = "app_answer_spellings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256(namespace, text)
    token_ids: Mapped[list] = mapped_column(JSON)
    context: Mapped[list] = mapped_column(JSON, default=list)  # ContextUnit.to_dict each; [] for a plain chat
    used_at: Mapped[float] = mapped_column(Float, index=True)


@dataclass(frozen=True)
class Spelling:
    """An answer's generated ids (no end-of-turn token) and the retrieval context it was generated with."""

    token_ids: list[int]
    context: list[dict] = field(default_factory=list)


def spelling_key(namespace: str, text: str) -> str:
    return hashlib.sha256(f"{namespace}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()


class AnswerSpellings:
    """Generated answers' token ids by (namespace, text). Safe to share between threads."""

    def __init__(self, engine: Engine, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self._engine = engine
        self.max_rows = int(max_rows)
        self._lock = threading.Lock()
        self._since_prune = 0
        _Base.metadata.create_all(engine)

    def record(self, namespace: str, text: str, token_ids: Sequence[int], context: Sequence[dict] = ()) -> None:
        """Remember that `text` was generated as `token_ids` (a later record of the same text replaces it)."""
        if not text or not token_ids:
            return
        key = spelling_key(namespace, text)
        values = {"token_ids": [int(t) for t in token_ids], "context": list(context), "used_at": time.time()}
        with Session(self._engine) as db, db.begin():
            row = db.get(_SpellingRow, key)
            if row is None:
                db.add(_SpellingRow(key=key, **values))
            else:
                for name, value in values.items():
                    setattr(row, name, value)
        with self._lock:
            self._since_prune += 1
            due = self._since_prune >= max(1, self.max_rows // 10)
            if due:
                self._since_prune = 0
        if due:
            self.prune()

    def find(self, namespace: str, texts: Sequence[str]) -> dict[str, Spelling]:
        """The records of those of `texts` that were generated, by text (each found one is marked as used)."""
        keys = {spelling_key(namespace, t): t for t in dict.fromkeys(texts) if t}
        if not keys:
            return {}
        found: dict[str, Spelling] = {}
        with Session(self._engine) as db, db.begin():
            rows = db.scalars(select(_SpellingRow).where(_SpellingRow.key.in_(list(keys)))).all()
            for row in rows:
                found[keys[row.key]] = Spelling([int(t) for t in row.token_ids], list(row.context or []))
            if rows:
                db.execute(update(_SpellingRow).where(_SpellingRow.key.in_([r.key for r in rows]))
                           .values(used_at=time.time()))
        return found

    def prune(self) -> int:
        """Delete the least recently used records beyond `max_rows`. Returns how many went."""
        with Session(self._engine) as db, db.begin():
            excess = int(db.scalar(select(func.count()).select_from(_SpellingRow)) or 0) - self.max_rows
            if excess <= 0:
                return 0
            oldest = select(_SpellingRow.key).order_by(_SpellingRow.used_at).limit(excess)
            keys = list(db.scalars(oldest))
            db.execute(delete(_SpellingRow).where(_SpellingRow.key.in_(keys)))
            return len(keys)
