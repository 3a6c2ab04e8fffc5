"""`Corpus`: the one object the app and the CLI use (collections, ingestion, search, documents).

Consistency between the database and the FAISS files: the database is the truth (it holds every chunk's vector);
a FAISS file is a cache of it. Ingestion takes the collection's file lock (`fcntl.flock`, so ingestions of one
collection in several processes take turns), works on its own copy of the index and saves it atomically at the
end (also after a failure). A search uses the last saved index, reloaded when the file changes; if the database
holds chunks the file does not (a crash between commit and save) or the file holds chunks the database lost, the
index is brought in step from the database's vectors, and saved when the lock is free.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sqlalchemy import Engine

from retrieval.chunking import ChunkingConfig
from retrieval.embeddings import Embedder, SentenceTransformerEmbedder
from retrieval.errors import (
    EmbeddingModelMismatchError,
    InvalidCollectionNameError,
    InvalidQueryError,
    SourceNotFoundError,
    UnknownCollectionError,
    UnknownDocumentError,
)
from retrieval.index import IndexFileError, IndexParams, VectorIndex
from retrieval.ingest import Ingestion
from retrieval.records import CollectionInfo, DocumentInfo, DocumentText, Hit, IngestReport, ProgressCallback
from retrieval.search import search as search_collection
from retrieval.sources import IngestLimits, printable
from retrieval.tables import CollectionRow, CorpusDB

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9_.+@ -]")

try:
    import fcntl
except ImportError:  # not POSIX: in-process locking only
    fcntl = None  # type: ignore[assignment]


def check_collection_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidCollectionNameError(str(name))
    return name


class Corpus:
    """Collections of documents with a persisted vector index each.

    Args:
        engine: the app's SQLAlchemy engine (`app.database.make_engine`); the tables are created on it now.
        indexes_dir: where the FAISS files live (`Settings.indexes_dir`).
        uploads_dir: where `save_upload` puts uploaded files (`Settings.uploads_dir`).
        embedder: any `Embedder`; default the packaged all-MiniLM-L6-v2, loaded on first use, once per process.
        limits, chunking, index_params: ingestion safety limits, chunk budget, HNSW switch-over and parameters.
    """

    def __init__(self, engine: Engine, indexes_dir: str | Path, uploads_dir: str | Path | None = None,
                 embedder: Embedder | None = None, *, limits: IngestLimits = IngestLimits(),
                 chunking: ChunkingConfig = ChunkingConfig(), index_params: IndexParams = IndexParams()) -> None:
        self.db = CorpusDB(engine)
        self.indexes_dir = Path(indexes_dir)
        self.uploads_dir = Path(uploads_dir) if uploads_dir is not None else None
        self.limits = limits
        self.chunking = chunking
        self.index_params = index_params
        self._embedder = embedder
        self._lock = threading.Lock()
        self._indexes: dict[int, tuple[tuple[int, int, int] | None, VectorIndex]] = {}

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = SentenceTransformerEmbedder()
        return self._embedder

    # -- collections ---------------------------------------------------------------------------------------------

    def create_collection(self, name: str) -> CollectionInfo:
        """Create a collection for the current embedder (an existing one of that name is returned as it is)."""
        row = self._collection_for_write(name)
        return self._info(row)

    def list_collections(self) -> list[CollectionInfo]:
        return [CollectionInfo(r.name, docs, chunks, r.embedding_model, r.created_at)
                for r, docs, chunks in self.db.list_collections()]

    def delete_collection(self, name: str) -> None:
        """Delete a collection, its documents, chunks and index file."""
        row = self.db.require_collection(check_collection_name(name))
        with self._file_lock(row.id):
            self.db.delete_collection(row.id)
            self._index_path(row.id).unlink(missing_ok=True)
        with self._lock:
            self._indexes.pop(row.id, None)
        self._lock_path(row.id).unlink(missing_ok=True)

    def _info(self, row: CollectionRow) -> CollectionInfo:
        for info in self.list_collections():
            if info.name == row.name:
                return info
        return CollectionInfo(row.name, 0, 0, row.embedding_model, row.created_at)

    def _collection_for_write(self, name: str) -> CollectionRow:
        check_collection_name(name)
        row = self.db.get_collection(name)
        if row is None:
            row = self.db.create_collection(name, self.embedder.name, self.embedder.dim)
        self._check_model(row)
        return row

    def _check_model(self, row: CollectionRow) -> None:
        if row.embedding_model != self.embedder.name:
            raise EmbeddingModelMismatchError(row.name, row.embedding_model, self.embedder.name)

    # -- ingestion -----------------------------------------------------------------------------------------------

    def ingest(self, collection: str, paths: Sequence[str | Path] | str | Path,
               progress: ProgressCallback | None = None) -> IngestReport:
        """Ingest files, folders, .zip archives or git repositories into a collection (created if needed).

        A path that does not exist stops the request before anything is done (SourceNotFoundError)."""
        check_collection_name(collection)
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not paths:
            raise SourceNotFoundError("(no path given)")
        for path in paths:
            if not os.path.lexists(Path(path).expanduser()):
                raise SourceNotFoundError(printable(str(path)))
        row = self._collection_for_write(collection)
        with self._file_lock(row.id):
            current = self.db.get_collection(collection)
            if current is None or current.id != row.id:  # deleted while we waited for the lock
                raise UnknownCollectionError(collection)
            index = self._load_index(row, persist=False)
            try:
                report = Ingestion(self.db, row, index, self.embedder, limits=self.limits, chunking=self.chunking,
                                   progress=progress).run(paths)
            finally:
                self._save(row, index)
        log.info("ingested into %s: %d documents (%d chunks embedded), %d skipped, %d removed in %.1f s",
                 collection, len(report.documents), report.chunks_embedded, len(report.skipped),
                 len(report.removed), report.seconds)
        return report

    def remove_documents(self, collection: str, paths: Sequence[str]) -> list[str]:
        """Remove documents by display path; returns the paths removed."""
        row = self.db.require_collection(check_collection_name(collection))
        docs = [d for d in self.db.documents(row.id) if d.path in set(paths)]
        missing = sorted(set(paths) - {d.path for d in docs})
        if missing:
            raise UnknownDocumentError(collection, missing)
        with self._file_lock(row.id):
            index = self._load_index(row, persist=False)
            removed = self.db.remove_documents([d.id for d in docs])
            index.remove(np.asarray(removed, dtype=np.int64))
            self._save(row, index)
        return sorted(d.path for d in docs)

    def save_upload(self, collection: str, filename: str, data: bytes | BinaryIO) -> Path:
        """Store an uploaded file under `uploads_dir/<collection>/` (name sanitized) and return its path."""
        if self.uploads_dir is None:
            raise ValueError("this Corpus was made without an uploads_dir")
        check_collection_name(collection)
        name = _UNSAFE_FILENAME.sub("_", Path(filename.replace("\\", "/")).name).strip(" .") or "upload"
        folder = self.uploads_dir / collection
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".upload.", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    f.write(data)
                else:
                    while block := data.read(1 << 20):
                        f.write(block)
            target = folder / name
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    # -- search --------------------------------------------------------------------------------------------------

    def search(self, collection: str, queries: Sequence[str] | str, k: int = 5, hybrid: bool = False
               ) -> list[list[Hit]]:
        """Top-k chunks for each query (one embedder call for all of them), best first."""
        if isinstance(queries, str):
            queries = [queries]
        if k < 1:
            raise InvalidQueryError(f"k must be at least 1, got {k}")
        if not queries or any(not q.strip() for q in queries):
            raise InvalidQueryError("empty query: give at least one non-blank question")
        row = self.db.require_collection(check_collection_name(collection))
        self._check_model(row)
        index = self._cached_index(row)
        return search_collection(self.db, row, index, self.embedder, list(queries), k, hybrid)

    # -- documents -----------------------------------------------------------------------------------------------

    def list_documents(self, collection: str) -> list[DocumentInfo]:
        row = self.db.require_collection(check_collection_name(collection))
        return [DocumentInfo(d.id, d.path, d.kind, d.source_type, d.origin, d.size, d.sha256, d.n_chunks,
                             d.n_tokens, d.ingested_at) for d in self.db.documents(row.id)]

    def document_texts(self, collection: str, paths: Sequence[str] | None = None) -> list[DocumentText]:
        """Whole documents (all when `paths` is None), in canonical order: by path, then document id."""
        row = self.db.require_collection(check_collection_name(collection))
        docs = self.db.document_texts(row.id, paths)
        if paths is not None:
            missing = sorted(set(paths) - {d.path for d in docs})
            if missing:
                raise UnknownDocumentError(collection, missing)
        return [DocumentText(d.id, d.path, d.text, d.kind) for d in docs]

    def chunk_records(self, collection: str) -> list:
        """Every chunk of the collection (`retrieval.tables.ChunkRecord`: path, idx, text, line range), in
        (path, idx) order."""
        row = self.db.require_collection(check_collection_name(collection))
        records = self.db.chunks(self.db.chunk_ids(row.id).tolist())
        return sorted(records.values(), key=lambda r: (r.path, r.idx))

    # -- the vector index ----------------------------------------------------------------------------------------

    def _index_path(self, collection_id: int) -> Path:
        return self.indexes_dir / f"retrieval-{collection_id}.faiss"

    def _lock_path(self, collection_id: int) -> Path:
        return self.indexes_dir / f"retrieval-{collection_id}.lock"

    @contextlib.contextmanager
    def _file_lock(self, collection_id: int, blocking: bool = True) -> Iterator[bool]:
        """The collection's inter-process lock; yields False when not blocking and the lock is taken."""
        self.indexes_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield True
            return
        with open(self._lock_path(collection_id), "a+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _stamp(self, collection_id: int) -> tuple[int, int, int] | None:
        try:
            st = self._index_path(collection_id).stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load_index(self, row: CollectionRow, persist: bool) -> VectorIndex:
        """The collection's index from its file, brought in step with the database."""
        path = self._index_path(row.id)
        index = None
        if path.exists():
            try:
                index = VectorIndex.load(path, self.index_params)
            except IndexFileError as exc:
                log.warning("%s; rebuilding it from the database", exc)
        if index is None or index.dim != row.dim:
            index = VectorIndex(row.dim, self.index_params)
        if self._sync(row, index) and persist:
            with self._file_lock(row.id, blocking=False) as locked:
                if locked:
                    self._save(row, index)
        return index

    def _sync(self, row: CollectionRow, index: VectorIndex) -> bool:
        """Make the index hold exactly the database's chunks; returns whether it changed."""
        db_ids = self.db.chunk_ids(row.id)
        index_ids = index.ids()
        extra = np.setdiff1d(index_ids, db_ids, assume_unique=True)
        missing = np.setdiff1d(db_ids, index_ids, assume_unique=True)
        if len(extra) == 0 and len(missing) == 0:
            return False
        log.info("collection %s: index out of step with the database (%d extra, %d missing); repairing",
                 row.name, len(extra), len(missing))
        index.remove(extra)
        ids, vectors = self.db.embeddings(missing.tolist(), row.dim)
        index.add(ids, vectors)
        return True

    def _save(self, row: CollectionRow, index: VectorIndex) -> None:
        index.save(self._index_path(row.id))
        with self._lock:
            self._indexes[row.id] = (self._stamp(row.id), index)

    def _cached_index(self, row: CollectionRow) -> VectorIndex:
        stamp = self._stamp(row.id)
        with self._lock:
            cached = self._indexes.get(row.id)
        if cached is not None and stamp is not None and cached[0] == stamp:
            return cached[1]
        index = self._load_index(row, persist=True)
        with self._lock:
            self._indexes[row.id] = (self._stamp(row.id), index)
        return index
