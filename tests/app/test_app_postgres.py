"""Two app replicas on one PostgreSQL database and one data folder: a session started on one is resumed on the
other, whose follow-up reuses the cache pages the first one wrote (the README's scale-out setup)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.postgres

QUESTION = "How does the cache store key its entries?"


def test_replicas_share_sessions_collections_and_cache(postgres_server, data_dir, corpus_dir, tiny_model):
    from tiny import HashingEmbedder

    from app.service import ChatService
    from app.settings import Settings

    settings = Settings(data_dir=data_dir, database_url=postgres_server.create_database(), top_k=3,
                        max_new_tokens=12)
    first = ChatService(settings, model=tiny_model, embedder=HashingEmbedder())
    second = ChatService(settings, model=tiny_model, embedder=HashingEmbedder())
    try:
        first.ingest_paths("docs", [str(corpus_dir)])
        asked = first.ask(QUESTION, "docs")
        assert second.collection_names() == ["docs"]
        info, turns = second.session(asked.session_id)
        assert info.collection == "docs" and [t.answer for t in turns] == [asked.answer]
        follow = second.ask("And what is the namespace?", "docs", asked.session_id)
        assert follow.metrics["reused_tokens"] >= 256  # pages written by the other replica
        assert [t.question for t in first.session(asked.session_id)[1]] == [QUESTION, "And what is the namespace?"]
        second.delete_session(asked.session_id)
        assert first.sessions() == []
    finally:
        first.close()
        second.close()


def test_a_postgres_database_from_before_owners_migrates(postgres_server):
    from sqlalchemy import text
    from test_owners import OLD_SCHEMA

    from app.database import make_engine
    from app.sessions import SessionStore

    engine = make_engine(postgres_server.create_database())
    try:
        with engine.begin() as conn:
            for statement in OLD_SCHEMA:
                conn.execute(text(statement.replace("DATETIME", "TIMESTAMP WITH TIME ZONE")
                                  .replace("INTEGER NOT NULL PRIMARY KEY", "SERIAL PRIMARY KEY")))
        stores = [SessionStore(engine), SessionStore(engine)]  # a second replica finds the column there
        old = "0123456789abcdef0123456789abcdef"
        assert stores[0].get(old).owner is None and len(stores[1].turns(old)) == 1
        assert stores[1].list(owner="user:ann") == []
        new = stores[0].create("docs", owner="user:ann")
        assert [s.id for s in stores[1].list(owner="user:ann")] == [new.id]
    finally:
        engine.dispose()
