"""What holds the store's disk space: tokens stored, and the bytes each owner (a chat session...) pins."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from tpa_core.store.tables import READY, Entry, Link


@dataclass(frozen=True)
class OwnerUsage:
    """The ready pages one owner pins. A page several owners share counts in full for each of them."""

    owner: str
    entries: int
    bytes: int
    tokens: int


def stored_tokens(engine: Engine) -> int:
    """Tokens held by ready pages (a tail and the page that later replaced it may both count)."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.sum(Entry.n_tokens), 0))
                                .where(Entry.state == READY)).scalar_one())


def pinned_by_owner(engine: Engine, prefix: str = "", limit: int = 200) -> list[OwnerUsage]:
    """Owners whose name starts with `prefix`, the largest first (at most `limit`)."""
    query = (select(Link.owner, func.count(Entry.key), func.coalesce(func.sum(Entry.nbytes), 0),
                    func.coalesce(func.sum(Entry.n_tokens), 0))
             .join(Entry, Entry.key == Link.key)
             .where(Entry.state == READY, Link.owner.startswith(prefix, autoescape=True))
             .group_by(Link.owner)
             .order_by(func.sum(Entry.nbytes).desc(), Link.owner)
             .limit(limit))
    with engine.connect() as conn:
        return [OwnerUsage(owner, int(n), int(size), int(tokens)) for owner, n, size, tokens in conn.execute(query)]
