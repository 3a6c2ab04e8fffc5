"""A FAISS vector index per collection: exact inner product while small, HNSW above a threshold.

Vectors are keyed by their chunk id (the database primary key, never reused) through `IndexIDMap2`, so the id
map lives inside the FAISS index. HNSW cannot remove vectors: a removed id becomes a tombstone that searches
filter out (an `IDSelectorNot` inside the HNSW walk, so k results still come back), and the graph is rebuilt
without them once they pass `compact_fraction` of it. The file is written whole and renamed into place, so a
reader sees the old index or the new one, never a torn one.

File layout: 8-byte magic, 8-byte little-endian header length, UTF-8 JSON header (format version, kind, dim,
tombstones), then `faiss.serialize_index` bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"TPARAGIX"
FORMAT_VERSION = 1


class IndexFileError(Exception):
    """An index file that is missing, truncated or not ours (the caller rebuilds it from the database)."""


@dataclass(frozen=True)
class IndexParams:
    """When to switch to HNSW and how to build and search it."""

    # Exact search over 100k x 384 takes ~15 ms on one core (benchmarks/RESULTS.md): exact up to 200k.
    hnsw_threshold: int = 200_000  # live vectors above which the exact index becomes HNSW
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 96
    compact_fraction: float = 0.2  # tombstones / vectors above which HNSW is rebuilt


def _faiss():
    import faiss

    return faiss


SMALL_BATCH = 16  # queries below which a search runs on one OpenMP thread


@contextlib.contextmanager
def _one_thread_for(n_queries: int) -> Iterator[None]:
    """FAISS parallelizes a search over its queries; for one or a few queries the OpenMP team only adds
    overhead, and on a busy machine spinning threads make it several times slower (benchmarks/NOTES.md)."""
    if n_queries >= SMALL_BATCH:
        yield
        return
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class VectorIndex:
    """Inner-product search over unit vectors `[N, dim]` keyed by int64 ids."""

    def __init__(self, dim: int, params: IndexParams = IndexParams()) -> None:
        self.dim = dim
        self.params = params
        self.kind = "flat"
        self._deleted: set[int] = set()
        self._index = self._new_index("flat")

    # -- construction --------------------------------------------------------------------------------------------

    def _new_index(self, kind: str):
        faiss = _faiss()
        if kind == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        else:
            inner = faiss.IndexHNSWFlat(self.dim, self.params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.params.ef_construction
            inner.hnsw.efSearch = self.params.ef_search
        return faiss.IndexIDMap2(inner)

    def _stored_ids(self) -> np.ndarray:
        """Every stored id, tombstones included: `[N]` int64."""
        if self._index.ntotal == 0:
            return np.empty(0, dtype=np.int64)
        return _faiss().vector_to_array(self._index.id_map).astype(np.int64)

    def _stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored vector and id, tombstones included: `[N]` int64 ids, `[N, dim]` float32 vectors."""
        faiss = _faiss()
        n = self._index.ntotal
        if n == 0:
            return np.empty(0, dtype=np.int64), np.empty((0, self.dim), dtype=np.float32)
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = faiss.downcast_index(self._index.index).reconstruct_n(0, n)
        return ids, vectors

    def _rebuild(self) -> None:
        """Drop tombstones and pick the kind for the live count."""
        ids, vectors = self._stored()
        if self._deleted:
            keep = ~np.isin(ids, np.fromiter(self._deleted, dtype=np.int64, count=len(self._deleted)))
            ids, vectors = ids[keep], vectors[keep]
        kind = "hnsw" if len(ids) > self.params.hnsw_threshold else "flat"
        log.info("rebuilding the vector index: %d vectors, %s", len(ids), kind)
        self.kind = kind
        self._deleted = set()
        self._index = self._new_index(kind)
        if len(ids):
            self._index.add_with_ids(np.ascontiguousarray(vectors), ids)

    # -- queries -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._index.ntotal - len(self._deleted)

    def ids(self) -> np.ndarray:
        """The live ids, sorted: `[len(self)]` int64."""
        ids = self._stored_ids()
        if self._deleted:
            ids = ids[~np.isin(ids, np.fromiter(self._deleted, dtype=np.int64, count=len(self._deleted)))]
        return np.sort(ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product. queries `[Q, dim]` -> scores `[Q, k']` float32, ids `[Q, k']` int64, best first,
        with k' = min(k, len(self)); an id of -1 marks a slot HNSW could not fill."""
        queries = self._check_vectors(queries)
        k = min(k, len(self))
        if k <= 0:
            return np.empty((len(queries), 0), dtype=np.float32), np.empty((len(queries), 0), dtype=np.int64)
        if self.kind == "flat":
            with _one_thread_for(len(queries)):
                scores, ids = self._index.search(queries, k)
            return scores, ids
        faiss = _faiss()
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.params.ef_search, k)
        if self._deleted:
            batch = faiss.IDSelectorBatch(np.fromiter(self._deleted, dtype=np.int64, count=len(self._deleted)))
            selector = faiss.IDSelectorNot(batch)
            params.sel = selector  # `batch` and `selector` must outlive the search
        with _one_thread_for(len(queries)):
            scores, ids = self._index.search(queries, k, params=params)
        return scores, ids

    # -- updates -------------------------------------------------------------------------------------------------

    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors: expected [N, {self.dim}], got {list(vectors.shape)}")
        return vectors

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors `[N, dim]` under new ids `[N]` (ids already live are a caller bug)."""
        vectors = self._check_vectors(vectors)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.shape != (len(vectors),):
            raise ValueError(f"ids: expected [{len(vectors)}], got {list(ids.shape)}")
        if len(ids) == 0:
            return
        if self._deleted and not self._deleted.isdisjoint(ids.tolist()):
            self._rebuild()  # a tombstoned id coming back must not stay hidden
        self._index.add_with_ids(vectors, ids)
        if self.kind == "flat" and self._index.ntotal > self.params.hnsw_threshold:
            self._rebuild()

    def remove(self, ids: np.ndarray | list[int]) -> None:
        """Remove ids (unknown ids are ignored)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if self.kind == "flat":
            self._index.remove_ids(ids)
            return
        self._deleted.update(ids.tolist())
        self._deleted.intersection_update(self._stored_ids().tolist())
        if len(self._deleted) > self.params.compact_fraction * max(self._index.ntotal, 1):
            self._rebuild()

    # -- persistence ---------------------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the index to `path` atomically (temporary file in the same folder, fsync, rename)."""
        faiss = _faiss()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"version": FORMAT_VERSION, "kind": self.kind, "dim": self.dim,
                             "deleted": sorted(self._deleted)}).encode()
        body = faiss.serialize_index(self._index)  # uint8 array
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", len(header)) + header)
                f.write(memoryview(body))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: Path, params: IndexParams = IndexParams()) -> VectorIndex:
        """Read an index written by `save`; raises IndexFileError when the file is missing or damaged."""
        faiss = _faiss()
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise IndexFileError(f"cannot read {path}: {exc}") from exc
        if len(data) < 16 or data[:8] != MAGIC:
            raise IndexFileError(f"{path} is not a tpa-rag vector index")
        (header_len,) = struct.unpack("<Q", data[8:16])
        try:
            header = json.loads(data[16:16 + header_len])
            if header["version"] != FORMAT_VERSION:
                raise IndexFileError(f"{path}: index format {header['version']}, expected {FORMAT_VERSION}")
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8, offset=16 + header_len))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise IndexFileError(f"{path} is damaged: {exc}") from exc
        if index.d != header["dim"]:
            raise IndexFileError(f"{path}: header says dim {header['dim']}, index has {index.d}")
        self = cls(int(header["dim"]), params)
        self.kind = header["kind"]
        self._deleted = {int(i) for i in header["deleted"]}
        self._index = index
        if self.kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = params.ef_search
        return self
