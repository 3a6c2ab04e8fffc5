"""retrieval: corpora -> chunks -> embeddings -> FAISS. Never imports tpa_core.

The API the app uses is one object, `Corpus` (retrieval/corpus.py):

    from app.database import make_engine
    from retrieval import Corpus

    corpus = Corpus(make_engine(settings.db_url), settings.indexes_dir, settings.uploads_dir, embedder=None)
    corpus.create_collection("docs")                       # -> CollectionInfo (idempotent)
    report = corpus.ingest("docs", ["README.md", "src/", "notes.zip"], progress=callback)
    report.documents / report.skipped / report.removed      # IngestedDocument(path, chunks, status, document_id),
                                                            # Skipped(path, reason), removed paths
    hits = corpus.search("docs", ["how do I ...?", "where is ...?"], k=5, hybrid=False)
    hits[0][0]                                              # Hit(path, score, start_line, end_line, text,
                                                            #     chunk_id, document_id, chunk_index)
    corpus.list_collections() / corpus.delete_collection("docs")
    corpus.list_documents("docs")                           # -> [DocumentInfo], by path
    corpus.document_texts("docs", ["docs/a.md"])            # -> [DocumentText(document_id, path, text, kind)]
                                                            #    whole documents for pinned mode, by path
    corpus.remove_documents("docs", ["docs/a.md"])
    corpus.save_upload("docs", "report.pdf", data)          # -> Path under uploads_dir/docs/, then ingest it

- `embedder`: anything with `name`, `dim` and `embed(texts, progress=None) -> float32 [N, dim]` unit rows
  (`retrieval.embeddings.Embedder`); default: the packaged all-MiniLM-L6-v2, loaded once per process on first use.
- `progress(IngestProgress(files_done, files_total, chunks_embedded, path))` is called after each file and each
  embedded batch.
- Paths: a document's display path is the name of what was ingested followed by the path inside it
  (`src/pkg/mod.py`, `notes.zip/a/b.md`, or just `README.md` for a single file). Lines are 1-based, inclusive.
- Errors a user can act on raise `retrieval.errors.RetrievalError` subclasses; bad files are never errors, they
  are reported in `IngestReport.skipped` with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retrieval.chunking import ChunkingConfig
    from retrieval.corpus import Corpus
    from retrieval.embeddings import Embedder, SentenceTransformerEmbedder
    from retrieval.index import IndexParams
    from retrieval.records import (
        CollectionInfo,
        DocumentInfo,
        DocumentText,
        Hit,
        IngestedDocument,
        IngestProgress,
        IngestReport,
    )
    from retrieval.sources import IngestLimits, Skipped

_EXPORTS = {
    "Corpus": "retrieval.corpus",
    "ChunkingConfig": "retrieval.chunking",
    "Embedder": "retrieval.embeddings",
    "SentenceTransformerEmbedder": "retrieval.embeddings",
    "IndexParams": "retrieval.index",
    "CollectionInfo": "retrieval.records",
    "DocumentInfo": "retrieval.records",
    "DocumentText": "retrieval.records",
    "Hit": "retrieval.records",
    "IngestedDocument": "retrieval.records",
    "IngestProgress": "retrieval.records",
    "IngestReport": "retrieval.records",
    "IngestLimits": "retrieval.sources",
    "Skipped": "retrieval.sources",
}

__all__ = [
    "ChunkingConfig",
    "CollectionInfo",
    "Corpus",
    "DocumentInfo",
    "DocumentText",
    "Embedder",
    "Hit",
    "IndexParams",
    "IngestLimits",
    "IngestProgress",
    "IngestReport",
    "IngestedDocument",
    "SentenceTransformerEmbedder",
    "Skipped",
]


def __getattr__(name: str):
    """Lazy exports: `import retrieval` stays cheap (no SQLAlchemy, numpy or FAISS until used)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
