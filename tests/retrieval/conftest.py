"""Fixtures of retrieval's tests: the real MiniLM embedder (loaded once per session) behind a call counter."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from retrieval.embeddings import SentenceTransformerEmbedder


class CountingEmbedder:
    """The real embedder, counting calls and texts (and optionally renamed, to test a model mismatch)."""

    def __init__(self, inner: SentenceTransformerEmbedder, name: str | None = None) -> None:
        self.inner = inner
        self.name = name or inner.name
        self.calls = 0
        self.texts: list[str] = []

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed(self, texts: Sequence[str], progress=None) -> np.ndarray:  # noqa: ANN001
        self.calls += 1
        self.texts.extend(texts)
        return self.inner.embed(texts, progress=progress)

    def reset(self) -> None:
        self.calls = 0
        self.texts = []


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
