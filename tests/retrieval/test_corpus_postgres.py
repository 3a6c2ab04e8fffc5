"""The corpus on PostgreSQL: tables, incremental ingestion, keyword search (tsvector) in hybrid mode, deletion.

The server is the suite's throwaway cluster (`postgres_server` in tests/conftest.py); without a server the test
is skipped with the reason.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url(postgres_server) -> str:
    return postgres_server.create_database()


def test_corpus_on_postgres(pg_url, embedder, tmp_path):
    from app.database import make_engine
    from retrieval import Corpus
    from retrieval.fulltext import search as keyword_search

    engine = make_engine(pg_url)
    try:
        corpus = Corpus(engine, tmp_path / "indexes", tmp_path / "uploads", embedder=embedder)
        assert corpus.db.keyword_search_available
        folder = tmp_path / "kb"
        folder.mkdir()
        (folder / "mill.md").write_text("The windmill grinds grain into flour when the sails turn.\n")
        (folder / "reef.md").write_text("Coral reefs shelter thousands of fish species in warm shallow seas.\n")
        report = corpus.ingest("pg", [folder])
        assert report.chunks_total == 2
        embedder.reset()
        assert corpus.ingest("pg", [folder]).chunks_embedded == 0 and embedder.calls == 0

        row = corpus.db.require_collection("pg")
        with engine.connect() as conn:
            ids = keyword_search(conn, row.id, "Which windmills grind grain?", 10)
        assert [corpus.db.chunks(ids)[i].path for i in ids] == ["kb/mill.md"]  # stemming: windmills -> windmill

        for hybrid in (False, True):
            hits = corpus.search("pg", ["where do fish live", "grinding flour"], k=2, hybrid=hybrid)
            assert [h[0].path for h in hits] == ["kb/reef.md", "kb/mill.md"]
        corpus.delete_collection("pg")
        assert corpus.list_collections() == []
    finally:
        engine.dispose()
