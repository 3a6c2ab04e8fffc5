"""Top-k search over one collection: vector search, optionally fused with keyword (BM25) search.

Hybrid search ranks each query twice, by cosine similarity (FAISS) and by keyword relevance (`fulltext`), over
`max(4k, 50)` candidates each, and fuses the two rankings by reciprocal rank fusion: a chunk scores
`sum 1 / (RRF_K + rank)` over the rankings it appears in (rank from 1). RRF needs no score calibration between
the two, which is why it is the usual choice. Where keyword search is unavailable, hybrid falls back to the
vector ranking (and says so in the log).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from retrieval.embeddings import Embedder
from retrieval.index import VectorIndex
from retrieval.records import Hit
from retrieval.tables import CollectionRow, CorpusDB

log = logging.getLogger(__name__)

RRF_K = 60
MIN_CANDIDATES = 50


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], rrf_k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse rankings (ids, best first) into one: (id, score) by descending score, ties by first appearance."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (rrf_k + rank)
    order = {item: i for i, item in enumerate(dict.fromkeys(i for r in rankings for i in r))}
    return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))


def search(db: CorpusDB, collection: CollectionRow, index: VectorIndex, embedder: Embedder,
           queries: Sequence[str], k: int, hybrid: bool) -> list[list[Hit]]:
    """For each query, its top-k hits, best first (fewer when the collection holds fewer chunks)."""
    if not queries:
        return []
    vectors = np.asarray(embedder.embed(list(queries)), dtype=np.float32)  # [Q, dim]
    candidates = max(4 * k, MIN_CANDIDATES) if hybrid else k
    scores, ids = index.search(vectors, candidates)  # [Q, candidates] each
    if hybrid and not db.keyword_search_available:
        log.warning("keyword search is not available on this database: hybrid search uses the vector ranking")
    ranked: list[list[tuple[int, float]]] = []
    for q, query in enumerate(queries):
        vector_ranking = [(int(i), float(s)) for i, s in zip(ids[q], scores[q]) if i >= 0]
        if hybrid and db.keyword_search_available:
            keyword_ranking = db.keyword_search(collection.id, query, candidates)
            ranked.append(reciprocal_rank_fusion([[i for i, _ in vector_ranking], keyword_ranking]))
        else:
            ranked.append(vector_ranking)
    # Chunks deleted since the index was loaded are not in the database any more: they drop out here.
    wanted = {i for r in ranked for i, _ in r}
    records = db.chunks(sorted(wanted))
    results = []
    for r in ranked:
        hits = []
        for chunk_id, score in r:
            record = records.get(chunk_id)
            if record is None:
                continue
            hits.append(Hit(path=record.path, score=score, start_line=record.start_line, end_line=record.end_line,
                            text=record.text, chunk_id=record.id, document_id=record.document_id,
                            chunk_index=record.idx))
            if len(hits) == k:
                break
        results.append(hits)
    return results
