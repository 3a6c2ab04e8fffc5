"""The plain records retrieval hands out: hits, ingestion reports, collection and document summaries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from retrieval.sources import Skipped


@dataclass(frozen=True)
class Hit:
    """One search result. Lines are 1-based and inclusive; `score` is the cosine similarity, or with hybrid
    search the reciprocal-rank-fusion score (sum over the two rankings of 1 / (60 + rank))."""

    path: str
    score: float
    start_line: int
    end_line: int
    text: str
    chunk_id: int
    document_id: int
    chunk_index: int

    def to_json(self) -> dict:
        """The CLI's hit shape."""
        return {"path": self.path, "score": round(float(self.score), 6), "start_line": self.start_line,
                "end_line": self.end_line, "text": self.text}


@dataclass
class IngestedDocument:
    """A file seen by an ingestion: 'added', 'updated' (re-chunked and re-embedded) or 'unchanged'."""

    path: str
    chunks: int
    status: str
    document_id: int


@dataclass
class IngestReport:
    """What one ingestion did. `chunks_total` counts the chunks of `documents`; `chunks_embedded` those embedded
    by this run (0 when nothing changed)."""

    collection: str
    documents: list[IngestedDocument] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    warnings: list[Skipped] = field(default_factory=list)
    chunks_embedded: int = 0
    seconds: float = 0.0

    @property
    def chunks_total(self) -> int:
        return sum(d.chunks for d in self.documents)

    def to_json(self) -> dict:
        """The CLI's `ingest --json` shape."""
        return {
            "collection": self.collection,
            "documents": [{"path": d.path, "chunks": d.chunks} for d in self.documents],
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "chunks_total": self.chunks_total,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class IngestProgress:
    """Passed to the progress callback after each file and after each embedded batch."""

    files_done: int
    files_total: int
    chunks_embedded: int
    path: str


ProgressCallback = Callable[[IngestProgress], None]


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    documents: int
    chunks: int
    embedding_model: str
    created_at: float  # seconds since the epoch

    def to_json(self) -> dict:
        return {"name": self.name, "documents": self.documents, "chunks": self.chunks,
                "embedding_model": self.embedding_model, "created_at": self.created_at}


@dataclass(frozen=True)
class DocumentInfo:
    document_id: int
    path: str
    kind: str  # chunker used: python | markdown | code | prose
    source_type: str  # file | folder | git | zip
    origin: str  # the path that was ingested (folder, repository, archive or the file)
    size: int
    sha256: str
    chunks: int
    tokens: int  # sum of the chunks' token counts (overlaps counted twice)
    ingested_at: float


@dataclass(frozen=True)
class DocumentText:
    """A whole document as ingested (extracted text, `\\n` line ends) for pinned, long-context use."""

    document_id: int
    path: str
    text: str
    kind: str
