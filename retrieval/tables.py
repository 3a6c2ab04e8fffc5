"""Collections, documents and chunks in the app's database (SQLAlchemy), with their content hashes and vectors.

Tables (created on the engine given to `CorpusDB`, never at import):
- retrieval_collections: name, the embedding model and its dimension.
- retrieval_documents: one per ingested file, keyed by (collection, origin, relpath); display path, chunker
  kind, size, mtime (ns), sha256, the extracted text (for pinned mode) and totals.
- retrieval_chunks: text, char range, 1-based inclusive line range, token count, and the embedding (float32
  bytes), so a lost or damaged FAISS file is rebuilt without re-embedding.
Ids use AUTOINCREMENT on SQLite so that a deleted chunk's id is never handed out again (the vector index keys on
it). Deletes are explicit (chunks, then documents) rather than relying on the engine's foreign-key setting.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import (
    BigInteger,
    Engine,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from retrieval import fulltext
from retrieval.chunking import Chunk
from retrieval.errors import UnknownCollectionError

_BATCH = 5000  # ids per IN (...) list: well under SQLite's variable limit


class Base(DeclarativeBase):
    """retrieval's own metadata (the store and the sessions have theirs)."""


class CollectionRow(Base):
    __tablename__ = "retrieval_collections"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    embedding_model: Mapped[str] = mapped_column(String(1024))
    dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)


class DocumentRow(Base):
    __tablename__ = "retrieval_documents"
    __table_args__ = (UniqueConstraint("collection_id", "origin", "relpath"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("retrieval_collections.id", ondelete="CASCADE"),
                                               index=True)
    origin: Mapped[str] = mapped_column(Text)
    relpath: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    source_type: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    n_chunks: Mapped[int] = mapped_column(Integer)
    n_tokens: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    ingested_at: Mapped[float] = mapped_column(Float)


class ChunkRow(Base):
    __tablename__ = "retrieval_chunks"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("retrieval_collections.id", ondelete="CASCADE"),
                                               index=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("retrieval_documents.id", ondelete="CASCADE"), index=True)
    idx: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    start_char: Mapped[int] = mapped_column(Integer)
    end_char: Mapped[int] = mapped_column(Integer)
    start_line: Mapped[int] = mapped_column(Integer)
    end_line: Mapped[int] = mapped_column(Integer)
    n_tokens: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)


@dataclass(frozen=True)
class KnownDocument:
    """What incremental ingestion needs of a stored document (no text)."""

    id: int
    origin: str
    relpath: str
    path: str
    size: int
    mtime_ns: int
    sha256: str
    n_chunks: int


@dataclass
class NewDocument:
    """A document to write with its chunks and their vectors `[len(chunks), dim]`."""

    origin: str
    relpath: str
    path: str
    source_type: str
    kind: str
    size: int
    mtime_ns: int
    sha256: str
    text: str
    chunks: list[Chunk]
    vectors: np.ndarray
    replaces: int | None  # id of the stored version it replaces


@dataclass(frozen=True)
class ChunkRecord:
    id: int
    document_id: int
    idx: int
    path: str
    text: str
    start_line: int
    end_line: int


def _batches(ids: Sequence[int]) -> Iterable[list[int]]:
    ids = list(ids)
    for begin in range(0, len(ids), _BATCH):
        yield ids[begin:begin + _BATCH]


class CorpusDB:
    """The corpus tables on one engine; creates them (and the keyword index) when opened."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        Base.metadata.create_all(engine)
        self.keyword_search_available = fulltext.install(engine)
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._sessions()

    # -- collections ---------------------------------------------------------------------------------------------

    def get_collection(self, name: str) -> CollectionRow | None:
        with self.session() as s:
            return s.scalars(select(CollectionRow).where(CollectionRow.name == name)).one_or_none()

    def require_collection(self, name: str) -> CollectionRow:
        row = self.get_collection(name)
        if row is None:
            raise UnknownCollectionError(name)
        return row

    def create_collection(self, name: str, embedding_model: str, dim: int) -> CollectionRow:
        """Create a collection, or return the existing one of that name (another process may have won)."""
        try:
            with self.session() as s, s.begin():
                row = CollectionRow(name=name, embedding_model=embedding_model, dim=dim, created_at=time.time())
                s.add(row)
            return row
        except IntegrityError:
            return self.require_collection(name)

    def list_collections(self) -> list[tuple[CollectionRow, int, int]]:
        """(collection, documents, chunks), by name."""
        with self.session() as s:
            docs = {cid: n for cid, n in s.execute(select(DocumentRow.collection_id, func.count()).group_by(
                DocumentRow.collection_id))}
            chunks = {cid: n for cid, n in s.execute(select(ChunkRow.collection_id, func.count()).group_by(
                ChunkRow.collection_id))}
            rows = s.scalars(select(CollectionRow).order_by(CollectionRow.name)).all()
            return [(r, docs.get(r.id, 0), chunks.get(r.id, 0)) for r in rows]

    def delete_collection(self, collection_id: int) -> None:
        with self.session() as s, s.begin():
            s.execute(delete(ChunkRow).where(ChunkRow.collection_id == collection_id))
            s.execute(delete(DocumentRow).where(DocumentRow.collection_id == collection_id))
            s.execute(delete(CollectionRow).where(CollectionRow.id == collection_id))

    # -- documents -----------------------------------------------------------------------------------------------

    def known_documents(self, collection_id: int) -> dict[tuple[str, str], KnownDocument]:
        """The stored documents of a collection keyed by (origin, relpath)."""
        with self.session() as s:
            rows = s.execute(select(DocumentRow.id, DocumentRow.origin, DocumentRow.relpath, DocumentRow.path,
                                    DocumentRow.size, DocumentRow.mtime_ns, DocumentRow.sha256,
                                    DocumentRow.n_chunks).where(DocumentRow.collection_id == collection_id))
            return {(r.origin, r.relpath): KnownDocument(*r) for r in rows}

    def touch_document(self, document_id: int, size: int, mtime_ns: int) -> None:
        """Record a new mtime for a document whose content did not change."""
        with self.session() as s, s.begin():
            s.execute(update(DocumentRow).where(DocumentRow.id == document_id).values(size=size, mtime_ns=mtime_ns))

    def write_documents(self, collection_id: int, documents: list[NewDocument]
                        ) -> tuple[list[int], list[list[int]], list[int]]:
        """Insert documents and their chunks, replacing older versions, in one transaction.

        Returns the new document ids, the new chunk ids per document (in chunk order) and the ids of the chunks
        removed with the replaced versions.
        """
        replaced = [d.replaces for d in documents if d.replaces is not None]
        now = time.time()
        doc_ids: list[int] = []
        new_ids: list[list[int]] = []
        with self.session() as s, s.begin():
            removed = self._delete_documents(s, replaced)
            for doc in documents:
                doc_id = s.scalars(insert(DocumentRow).returning(DocumentRow.id), [{
                    "collection_id": collection_id, "origin": doc.origin, "relpath": doc.relpath,
                    "path": doc.path, "source_type": doc.source_type, "kind": doc.kind, "size": doc.size,
                    "mtime_ns": doc.mtime_ns, "sha256": doc.sha256, "n_chunks": len(doc.chunks),
                    "n_tokens": sum(c.n_tokens for c in doc.chunks), "text": doc.text, "ingested_at": now,
                }]).one()
                vectors = np.ascontiguousarray(doc.vectors, dtype="<f4")
                rows = [{
                    "collection_id": collection_id, "document_id": doc_id, "idx": i, "path": doc.path,
                    "text": c.text, "start_char": c.start_char, "end_char": c.end_char, "start_line": c.start_line,
                    "end_line": c.end_line, "n_tokens": c.n_tokens, "embedding": vectors[i].tobytes(),
                } for i, c in enumerate(doc.chunks)]
                ids = list(s.scalars(insert(ChunkRow).returning(ChunkRow.id, sort_by_parameter_order=True), rows))
                doc_ids.append(doc_id)
                new_ids.append(ids)
        return doc_ids, new_ids, removed

    def remove_documents(self, document_ids: list[int]) -> list[int]:
        """Delete documents; returns the ids of their chunks."""
        with self.session() as s, s.begin():
            return self._delete_documents(s, document_ids)

    @staticmethod
    def _delete_documents(s: Session, document_ids: list[int]) -> list[int]:
        removed: list[int] = []
        for batch in _batches(document_ids):
            removed.extend(s.scalars(select(ChunkRow.id).where(ChunkRow.document_id.in_(batch))))
            s.execute(delete(ChunkRow).where(ChunkRow.document_id.in_(batch)))
            s.execute(delete(DocumentRow).where(DocumentRow.id.in_(batch)))
        return removed

    def documents(self, collection_id: int) -> list[DocumentRow]:
        """Every document of a collection without its text, by path."""
        from sqlalchemy.orm import defer

        with self.session() as s:
            return list(s.scalars(select(DocumentRow).options(defer(DocumentRow.text)).where(
                DocumentRow.collection_id == collection_id).order_by(DocumentRow.path, DocumentRow.id)))

    def document_texts(self, collection_id: int, paths: Sequence[str] | None) -> list[DocumentRow]:
        """Documents with their text, by path; all of them when `paths` is None."""
        with self.session() as s:
            query = select(DocumentRow).where(DocumentRow.collection_id == collection_id)
            if paths is not None:
                query = query.where(DocumentRow.path.in_(list(paths)))
            return list(s.scalars(query.order_by(DocumentRow.path, DocumentRow.id)))

    # -- chunks --------------------------------------------------------------------------------------------------

    def chunk_ids(self, collection_id: int) -> np.ndarray:
        """`[N]` int64, sorted."""
        with self.session() as s:
            ids = s.scalars(select(ChunkRow.id).where(ChunkRow.collection_id == collection_id)
                            .order_by(ChunkRow.id)).all()
        return np.asarray(ids, dtype=np.int64)

    def embeddings(self, ids: Sequence[int], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Stored vectors: ids `[N]` int64 and vectors `[N, dim]` float32 (ids not found are left out)."""
        out_ids: list[int] = []
        blobs: list[bytes] = []
        with self.session() as s:
            for batch in _batches(ids):
                for chunk_id, blob in s.execute(select(ChunkRow.id, ChunkRow.embedding).where(ChunkRow.id.in_(batch))):
                    out_ids.append(chunk_id)
                    blobs.append(blob)
        vectors = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim)  # [N, dim]
        return np.asarray(out_ids, dtype=np.int64), vectors.astype(np.float32)

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkRecord]:
        with self.session() as s:
            out = {}
            for batch in _batches(ids):
                for r in s.execute(select(ChunkRow.id, ChunkRow.document_id, ChunkRow.idx, ChunkRow.path,
                                          ChunkRow.text, ChunkRow.start_line, ChunkRow.end_line)
                                   .where(ChunkRow.id.in_(batch))):
                    out[r.id] = ChunkRecord(*r)
            return out

    def keyword_search(self, collection_id: int, query: str, limit: int) -> list[int]:
        if not self.keyword_search_available:
            return []
        with self.engine.connect() as conn:
            return fulltext.search(conn, collection_id, query, limit)
