"""The FAISS index: exact search, HNSW switch-over, removal with tombstones, atomic persistence."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.index import IndexFileError, IndexParams, VectorIndex

DIM = 24


def unit_vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ vectors.T  # [Q, N]
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def test_flat_is_exact_and_removal_works():
    index = VectorIndex(DIM)
    vectors, ids = unit_vectors(97, 0), np.arange(1000, 1097, dtype=np.int64)
    index.add(ids, vectors)
    queries = unit_vectors(7, 1)
    scores, found = index.search(queries, 5)
    assert index.kind == "flat"
    np.testing.assert_array_equal(found, brute_force(vectors, ids, queries, 5))
    np.testing.assert_allclose(scores[:, 0], np.max(queries @ vectors.T, axis=1), rtol=1e-5)
    index.remove(found[:, 0])
    _, again = index.search(queries, 5)
    assert not set(found[:, 0].tolist()) & set(again.ravel().tolist())
    assert len(index) == 97 - len(set(found[:, 0].tolist()))


def test_search_more_than_stored_and_empty():
    index = VectorIndex(DIM)
    scores, ids = index.search(unit_vectors(2, 0), 5)
    assert scores.shape == (2, 0) and ids.shape == (2, 0)
    index.add(np.array([7, 8]), unit_vectors(2, 3))
    _, ids = index.search(unit_vectors(1, 4), 5)
    assert sorted(ids[0].tolist()) == [7, 8]


def test_shape_errors_name_the_tensor():
    index = VectorIndex(DIM)
    with pytest.raises(ValueError, match=r"expected \[N, 24\], got \[3, 5\]"):
        index.add(np.arange(3), np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="ids"):
        index.add(np.arange(2), unit_vectors(3, 0))


def test_hnsw_switch_tombstones_compaction_and_back():
    params = IndexParams(hnsw_threshold=300, compact_fraction=0.2)
    index = VectorIndex(DIM, params)
    vectors, ids = unit_vectors(400, 5), np.arange(1, 401, dtype=np.int64)
    index.add(ids[:250], vectors[:250])
    assert index.kind == "flat"
    index.add(ids[250:], vectors[250:])
    assert index.kind == "hnsw"
    queries = unit_vectors(20, 6)
    _, found = index.search(queries, 10)
    truth = brute_force(vectors, ids, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist())])
    assert recall >= 0.9
    # Tombstones: removed ids never come back, and k results are still returned.
    removed = truth[:, :3].ravel()
    index.remove(removed)
    assert index.kind == "hnsw" and index._deleted  # below the compaction threshold: tombstones
    _, found = index.search(queries, 10)
    assert not set(removed.tolist()) & set(found.ravel().tolist())
    assert (found >= 0).all()
    assert len(index) == 400 - len(set(removed.tolist()))
    # A tombstoned id that is added again is visible again.
    back = int(removed[0])
    index.add(np.array([back]), vectors[back - 1:back])
    _, found = index.search(vectors[back - 1:back], 1)
    assert found[0, 0] == back
    # Past the compaction fraction the graph is rebuilt; below the threshold it becomes exact again.
    index.remove(np.arange(1, 201))
    assert not index._deleted
    live = sorted((set(range(201, 401)) - set(removed.tolist())) | ({back} if back > 200 else set()))
    assert index.kind == "flat" and len(index) == len(live)
    np.testing.assert_array_equal(index.ids(), live)


@pytest.mark.parametrize("kind_threshold", [10_000, 50])
def test_save_load_round_trip(tmp_path, kind_threshold):
    params = IndexParams(hnsw_threshold=kind_threshold)
    index = VectorIndex(DIM, params)
    vectors, ids = unit_vectors(120, 9), np.arange(5, 125, dtype=np.int64)
    index.add(ids, vectors)
    index.remove(np.array([5, 6, 7]))
    path = tmp_path / "idx" / "c.faiss"
    index.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["c.faiss"], "no temporary file left behind"
    loaded = VectorIndex.load(path, params)
    assert loaded.kind == index.kind
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    queries = unit_vectors(4, 10)
    np.testing.assert_array_equal(loaded.search(queries, 6)[1], index.search(queries, 6)[1])


def test_damaged_files_are_reported(tmp_path):
    missing = tmp_path / "missing.faiss"
    with pytest.raises(IndexFileError):
        VectorIndex.load(missing)
    junk = tmp_path / "junk.faiss"
    junk.write_bytes(b"not an index at all")
    with pytest.raises(IndexFileError):
        VectorIndex.load(junk)
    index = VectorIndex(DIM)
    index.add(np.arange(10), unit_vectors(10, 0))
    good = tmp_path / "good.faiss"
    index.save(good)
    truncated = tmp_path / "truncated.faiss"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(IndexFileError):
        VectorIndex.load(truncated)
