"""Helpers of retrieval's tests (a module with a name of its own: every test folder has a `conftest`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

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

    def embed(self, texts: Sequence[str], progress=None) -> np.ndarray:
        self.calls += 1
        self.texts.extend(texts)
        return self.inner.embed(texts, progress=progress)

    def reset(self) -> None:
        self.calls = 0
        self.texts = []


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path
