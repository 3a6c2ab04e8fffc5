"""Keyword search for hybrid retrieval: SQLite FTS5 (BM25), or PostgreSQL's full-text search.

SQLite: an external-content FTS5 table over the chunks' path and text (porter stemming, unicode61 words, so
`make_engine` is the words `make` and `engine`), kept in step by triggers, ranked by `bm25()`.
PostgreSQL: `to_tsvector('english', path || ' ' || text)` with a GIN expression index, ranked by `ts_rank_cd`.
Other databases, or a SQLite without FTS5: no keyword search (`available` is False; hybrid search then returns
the vector ranking alone and logs why).

A question is turned into an OR of its words (stop words dropped), so a chunk needs only some of them.
"""

from __future__ import annotations

import logging
import re

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

log = logging.getLogger(__name__)

FTS_TABLE = "retrieval_chunks_fts"
MAX_TERMS = 32
MIN_TERMS = 2
COMMON_FRACTION = 0.1
STOP_WORDS = frozenset("""a an and are as at be but by can do does did for from has have how i if in into is it its
me my of on or so such that the their then there these this to was we what when where which who why will with
you your""".split())

_SQLITE_DDL = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_TABLE} USING fts5(path, text, content='retrieval_chunks', "
    f"content_rowid='id', tokenize='porter unicode61')",
    f"CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_ai AFTER INSERT ON retrieval_chunks BEGIN "
    f"INSERT INTO {FTS_TABLE}(rowid, path, text) VALUES (new.id, new.path, new.text); END",
    f"CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_ad AFTER DELETE ON retrieval_chunks BEGIN "
    f"INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, path, text) VALUES ('delete', old.id, old.path, old.text); END",
    f"CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_au AFTER UPDATE ON retrieval_chunks BEGIN "
    f"INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, path, text) VALUES ('delete', old.id, old.path, old.text); "
    f"INSERT INTO {FTS_TABLE}(rowid, path, text) VALUES (new.id, new.path, new.text); END",
)
_PG_DOCUMENT = "to_tsvector('english', path || ' ' || text)"
_PG_DDL = (f"CREATE INDEX IF NOT EXISTS retrieval_chunks_tsv ON retrieval_chunks USING gin ({_PG_DOCUMENT})",)


def install(engine: Engine) -> bool:
    """Create the keyword index if the database supports one; returns whether keyword search is available."""
    dialect = engine.dialect.name
    statements = _SQLITE_DDL if dialect == "sqlite" else _PG_DDL if dialect == "postgresql" else ()
    if not statements:
        log.warning("no keyword search on %s: hybrid search will use the vector ranking alone", dialect)
        return False
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    except OperationalError as exc:
        log.warning("keyword search unavailable (%s): hybrid search will use the vector ranking alone", exc)
        return False
    return True


def query_terms(query: str) -> list[str]:
    """The distinct lower-cased words of a question, stop words dropped, at most MAX_TERMS."""
    terms: list[str] = []
    for word in re.findall(r"\w+", query.lower()):
        if word not in STOP_WORDS and word not in terms:
            terms.append(word)
    return terms[:MAX_TERMS]


def _selective_terms(conn: Connection, terms: list[str]) -> list[str]:
    """Drop terms found in more than COMMON_FRACTION of all chunks, keeping at least MIN_TERMS of the rarest.

    BM25 gives such terms almost no weight (idf ~ log(1/f)), but every chunk they match must be scored: on 100k
    chunks one common word costs tens of milliseconds. Counting a term's matches is cheap by comparison.
    """
    if len(terms) <= MIN_TERMS:
        return terms
    total = conn.execute(text("SELECT count(*) FROM retrieval_chunks")).scalar() or 0
    counts = {t: conn.execute(text(f"SELECT count(*) FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH :m"),
                              {"m": f'"{t}"'}).scalar() or 0 for t in terms}
    by_rarity = sorted(terms, key=lambda t: counts[t])
    kept = {t for t in by_rarity[:MIN_TERMS]} | {t for t in terms if counts[t] <= COMMON_FRACTION * total}
    return [t for t in terms if t in kept and counts[t] > 0] or by_rarity[:MIN_TERMS]


def search(conn: Connection, collection_id: int, query: str, limit: int) -> list[int]:
    """Chunk ids of one collection ranked by keyword relevance to `query`, best first."""
    terms = query_terms(query)
    if not terms:
        return []
    if conn.dialect.name == "sqlite":
        terms = _selective_terms(conn, terms)
        match = " OR ".join(f'"{t}"' for t in terms)
        rows = conn.execute(text(
            f"SELECT c.id FROM {FTS_TABLE} f JOIN retrieval_chunks c ON c.id = f.rowid "
            f"WHERE {FTS_TABLE} MATCH :match AND c.collection_id = :cid "
            f"ORDER BY bm25({FTS_TABLE}) LIMIT :limit"), {"match": match, "cid": collection_id, "limit": limit})
    else:
        tsquery = " | ".join(terms)
        rows = conn.execute(text(
            f"SELECT id FROM retrieval_chunks, to_tsquery('english', :q) query "
            f"WHERE collection_id = :cid AND {_PG_DOCUMENT} @@ query "
            f"ORDER BY ts_rank_cd({_PG_DOCUMENT}, query) DESC LIMIT :limit"),
            {"q": tsquery, "cid": collection_id, "limit": limit})
    return [int(r[0]) for r in rows]
