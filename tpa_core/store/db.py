"""Small SQL helpers that read the same on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, insert, update
from sqlalchemy.exc import IntegrityError

from tpa_core.store.tables import COUNTERS, Counter

_IN_CHUNK = 500  # stay far below SQLite's bound-parameter limit in IN (...) lists


def insert_ignore(conn: Connection, model: type, values: dict[str, Any]) -> bool:
    """INSERT a row unless its primary key exists; True when this call inserted it.

    ON CONFLICT DO NOTHING on SQLite and PostgreSQL: the claim is atomic, so of several processes inserting the
    same key exactly one wins (that is how a page gets written once)."""
    name = conn.dialect.name
    if name in ("sqlite", "postgresql"):
        if name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        pk = model.__table__.primary_key.columns
        stmt = dialect_insert(model).values(**values).on_conflict_do_nothing().returning(*pk)
        return conn.execute(stmt).first() is not None
    try:
        with conn.begin_nested():
            conn.execute(insert(model).values(**values))
    except IntegrityError:
        return False
    return True


def ensure_counters(conn: Connection) -> None:
    for name in COUNTERS:
        insert_ignore(conn, Counter, {"name": name, "value": 0})


def bump(conn: Connection, increments: dict[str, int]) -> None:
    """Add to persistent counters (atomic `value = value + n`, safe under concurrent writers)."""
    for name, n in increments.items():
        if n:
            conn.execute(update(Counter).where(Counter.name == name).values(value=Counter.value + int(n)))


def chunks(items: Sequence[str] | Iterable[str], size: int = _IN_CHUNK) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
