"""Fixtures of retrieval's tests: the real MiniLM embedder (loaded once per session) behind a call counter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from retrieval_helpers import CountingEmbedder

from retrieval.embeddings import SentenceTransformerEmbedder


@pytest.fixture(scope="session")
def minilm() -> SentenceTransformerEmbedder:
    embedder = SentenceTransformerEmbedder()
    embedder.embed(["warm up"])
    return embedder


@pytest.fixture
def embedder(minilm) -> CountingEmbedder:
    return CountingEmbedder(minilm)


@pytest.fixture
def make_corpus(data_dir, embedder):
    """A factory of Corpus objects on one data directory (a second call = a second app instance)."""
    from app.database import make_engine
    from retrieval import Corpus

    engines = []

    def make(**kwargs):
        engine = make_engine(f"sqlite:///{data_dir / 'tpa_rag.sqlite'}")
        engines.append(engine)
        kwargs.setdefault("embedder", embedder)
        return Corpus(engine, data_dir / "indexes", data_dir / "uploads", **kwargs)

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def corpus(make_corpus):
    return make_corpus()
