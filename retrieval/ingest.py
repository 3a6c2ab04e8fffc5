"""Ingestion: files, folders, zip archives and git repositories -> documents, chunks, vectors.

Incremental: a file whose size and mtime match the stored document is not read; one whose sha256 matches is
not re-chunked (its mtime is updated); only new and changed files are chunked and embedded, in batches across
files. After each given folder, repository or archive, its documents that were not ingested this time (the file
is gone, or is now skipped) are removed from the collection, unless a limit cut its listing short (then they stay,
with a warning). A file that cannot be ingested is reported with the reason and never stops the others.

Each ingestion takes at most `IngestLimits.max_files` documents (all its paths together) and embeds at most
`IngestLimits.max_chunks` chunks; what is over a limit is reported as skipped with the limit named, and a later
run takes it (what was stored stays).

The embedder sees each chunk as `"<display path>\\n<chunk text>"`: the path is often the best hint of what a
chunk of code is about. The stored chunk text has no such header.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.chunking import Chunk, ChunkingConfig, chunk_text, kind_for_path
from retrieval.embeddings import Embedder
from retrieval.extract import Unextractable, extract
from retrieval.index import VectorIndex
from retrieval.records import IngestedDocument, IngestProgress, IngestReport, ProgressCallback
from retrieval.sources import IngestLimits, Listing, Skipped, SourceFile, SourceReadError, list_source
from retrieval.tables import CollectionRow, CorpusDB, KnownDocument, NewDocument

log = logging.getLogger(__name__)

FLUSH_CHUNKS = 256  # chunks embedded and written per batch


def embedding_input(path: str, chunk_text_: str) -> str:
    """What the embedder sees for a chunk."""
    return f"{path}\n{chunk_text_}"


@dataclass
class _Pending:
    file: SourceFile
    known: KnownDocument | None
    sha256: str
    text: str
    kind: str
    chunks: list[Chunk]


class Ingestion:
    """One ingestion run into one collection; `run` returns the report. The vector index is updated in memory
    (the caller saves it)."""

    def __init__(self, db: CorpusDB, collection: CollectionRow, index: VectorIndex, embedder: Embedder, *,
                 limits: IngestLimits, chunking: ChunkingConfig, progress: ProgressCallback | None,
                 flush_chunks: int = FLUSH_CHUNKS) -> None:
        self.db = db
        self.collection = collection
        self.index = index
        self.embedder = embedder
        self.limits = limits
        self.chunking = chunking
        self.progress = progress
        self.flush_chunks = flush_chunks
        self.report = IngestReport(collection=collection.name)
        self._pending: list[_Pending] = []
        self._done: dict[tuple[str, str], IngestedDocument] = {}
        self._files_done = 0
        self._files_total = 0
        self._current = ""
        self._chunks_taken = 0  # chunks of the documents queued for embedding, against limits.max_chunks
        self._cut_origins: set[str] = set()  # origins where a limit skipped a file: nothing is removed there

    def run(self, paths: Sequence[str | Path]) -> IngestReport:
        started = time.perf_counter()
        listings: list[Listing] = []
        try:
            for path in paths:
                listings.append(list_source(path, self.limits))
            files: dict[tuple[str, str], SourceFile] = {}
            for listing in listings:
                self.report.skipped.extend(listing.skipped)
                if not listing.complete:
                    self._cut_origins.add(listing.origin)
                for f in listing.files:
                    if (f.origin, f.relpath) in files:
                        continue
                    if len(files) >= self.limits.max_files:
                        self._cut(f, f"file limit reached ({self.limits.max_files} files)")
                        continue
                    files[(f.origin, f.relpath)] = f
            self._files_total = len(files)
            known = self.db.known_documents(self.collection.id)
            for key, f in files.items():
                self._current = f.path
                self._one(f, known.get(key))
                if sum(len(p.chunks) for p in self._pending) >= self.flush_chunks:
                    self._flush()
                self._files_done += 1
                self._notify()
            self._flush()
            self._remove_stale(listings, known)
        finally:
            for listing in listings:
                listing.close()
        self.report.documents = [self._done[key] for key in files if key in self._done]
        self.report.seconds = time.perf_counter() - started
        return self.report

    def _cut(self, f: SourceFile, reason: str) -> None:
        self.report.skipped.append(Skipped(f.path, reason))
        self._cut_origins.add(f.origin)

    def _notify(self) -> None:
        if self.progress is not None:
            self.progress(IngestProgress(self._files_done, self._files_total, self.report.chunks_embedded,
                                         self._current))

    def _one(self, f: SourceFile, known: KnownDocument | None) -> None:
        key = (f.origin, f.relpath)
        if known is not None and known.size == f.size and known.mtime_ns == f.mtime_ns:
            self._done[key] = IngestedDocument(f.path, known.n_chunks, "unchanged", known.id)
            return
        try:
            data = f.read()
        except SourceReadError as exc:
            self.report.skipped.append(Skipped(f.path, str(exc)))
            return
        except OSError as exc:
            self.report.skipped.append(Skipped(f.path, f"unreadable ({exc.strerror or exc})"))
            return
        sha256 = hashlib.sha256(data).hexdigest()
        if known is not None and known.sha256 == sha256:
            self.db.touch_document(known.id, f.size, f.mtime_ns)
            self._done[key] = IngestedDocument(f.path, known.n_chunks, "unchanged", known.id)
            return
        try:
            extracted = extract(f.relpath, data)
        except Unextractable as exc:
            self.report.skipped.append(Skipped(f.path, str(exc)))
            return
        for warning in extracted.warnings:
            self.report.warnings.append(Skipped(f.path, warning))
        kind = kind_for_path(f.relpath)
        chunks = chunk_text(extracted.text, kind, self.chunking)
        if not chunks:
            self.report.skipped.append(Skipped(f.path, "no text"))
            return
        cap = self.limits.max_chunks
        if len(chunks) > cap:
            self._cut(f, f"{len(chunks)} chunks, over the chunk limit of one ingestion ({cap} chunks)")
            return
        if self._chunks_taken + len(chunks) > cap:
            self._cut(f, f"chunk limit of one ingestion reached ({cap} chunks): ingest again for the rest")
            return
        self._chunks_taken += len(chunks)
        self._pending.append(_Pending(f, known, sha256, extracted.text, kind, chunks))

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        texts = [embedding_input(p.file.path, c.text) for p in pending for c in p.chunks]
        base = self.report.chunks_embedded

        def on_batch(done: int, _total: int) -> None:
            self.report.chunks_embedded = base + done
            self._notify()

        vectors = np.asarray(self.embedder.embed(texts, progress=on_batch), dtype=np.float32)  # [N, dim]
        if vectors.shape != (len(texts), self.collection.dim):
            raise ValueError(f"embedder returned {list(vectors.shape)}, expected [{len(texts)}, "
                             f"{self.collection.dim}]")
        self.report.chunks_embedded = base + len(texts)
        documents = []
        offset = 0
        for p in pending:
            n = len(p.chunks)
            f = p.file
            documents.append(NewDocument(
                origin=f.origin, relpath=f.relpath, path=f.path, source_type=f.source_type, kind=p.kind,
                size=f.size, mtime_ns=f.mtime_ns, sha256=p.sha256, text=p.text, chunks=p.chunks,
                vectors=vectors[offset:offset + n], replaces=p.known.id if p.known else None))
            offset += n
        doc_ids, chunk_ids, removed = self.db.write_documents(self.collection.id, documents)
        self.index.remove(np.asarray(removed, dtype=np.int64))
        for doc, doc_id, ids, p in zip(documents, doc_ids, chunk_ids, pending):
            self.index.add(np.asarray(ids, dtype=np.int64), doc.vectors)
            status = "updated" if p.known is not None else "added"
            self._done[(p.file.origin, p.file.relpath)] = IngestedDocument(p.file.path, len(p.chunks), status,
                                                                           doc_id)

    def _remove_stale(self, listings: list[Listing], known: dict[tuple[str, str], KnownDocument]) -> None:
        origins = {listing.origin for listing in listings}
        stale = [doc for key, doc in known.items() if key[0] in origins and key not in self._done]
        kept = [doc for doc in stale if doc.origin in self._cut_origins]
        for origin in sorted({doc.origin for doc in kept}):
            self.report.warnings.append(Skipped(
                Path(origin).name or origin, f"a limit cut this source short: {sum(d.origin == origin for d in kept)} "
                                             f"stored document(s) not ingested this time were not removed"))
        stale = [doc for doc in stale if doc.origin not in self._cut_origins]
        if not stale:
            return
        removed = self.db.remove_documents([doc.id for doc in stale])
        self.index.remove(np.asarray(removed, dtype=np.int64))
        self.report.removed.extend(sorted(doc.path for doc in stale))
