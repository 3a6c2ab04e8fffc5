"""Retrieval benchmark: quality on CPython's standard library, ingestion throughput, search latency at 100k chunks.

    python benchmarks/retrieval.py [--quality] [--latency] [--stdlib DIR] [--chunks 100000] [--json OUT]

(no flag = both parts)

Quality: the modules listed in benchmarks/retrieval_questions.json (CPython's Lib/, default: this interpreter's)
are copied into a temporary folder and ingested into a fresh collection with the real all-MiniLM-L6-v2; each
question counts a hit@k when one of its answer files is among the top-k hits' paths. Three rankings side by side:
vector, hybrid (vector + BM25 fused by RRF) and BM25 alone (the keyword baseline).
Ingestion: end-to-end chunks/s of `Corpus.ingest` against the baseline of embedding the same chunk texts with
`SentenceTransformer.encode` alone (what the pipeline adds: reading, chunking, SQLite, FAISS), and the time of
re-ingesting the unchanged corpus.
Latency: a collection of N synthetic chunks (random unit vectors, texts of random words) written through the
corpus tables; per-query latency of exact FAISS (IndexFlatIP), HNSW and a NumPy brute-force baseline, HNSW
recall@10 against exact, and end-to-end `Corpus.search` (query embedding + FAISS + SQLite fetch), with and
without hybrid. Medians over repeated single queries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # this checkout's packages first, installed or not

QUESTIONS = Path(__file__).with_name("retrieval_questions.json")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores visible)"


def make_corpus(data_dir: Path, embedder, **kwargs):
    from app.database import make_engine
    from retrieval import Corpus

    engine = make_engine(f"sqlite:///{data_dir / 'tpa_rag.sqlite'}")
    return Corpus(engine, data_dir / "indexes", data_dir / "uploads", embedder=embedder, **kwargs)


def rank_of(paths: list[str], answers: list[str], prefix: str) -> int | None:
    wanted = {prefix + a for a in answers}
    for rank, path in enumerate(paths, start=1):
        if path in wanted:
            return rank
    return None


def quality(stdlib: Path, embedder, work: Path) -> dict:
    spec = json.loads(QUESTIONS.read_text())
    source = work / "stdlib"
    for module in spec["modules"]:
        target = source / module
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(stdlib / module, target)
    corpus = make_corpus(work / "data", embedder)

    started = time.perf_counter()
    report = corpus.ingest("stdlib", [source])
    ingest_s = time.perf_counter() - started
    assert not report.skipped, report.skipped
    started = time.perf_counter()
    again = corpus.ingest("stdlib", [source])
    reingest_s = time.perf_counter() - started
    assert again.chunks_embedded == 0

    # Baseline: the same texts through the model alone, in the same batch size.
    from retrieval.ingest import embedding_input

    texts = [embedding_input(c.path, c.text) for c in _all_chunks(corpus)]
    model = embedder._model()
    started = time.perf_counter()
    model.encode(texts, batch_size=embedder.batch_size, normalize_embeddings=True, show_progress_bar=False)
    encode_s = time.perf_counter() - started

    from retrieval import fulltext

    questions = spec["questions"]
    queries = [q["q"] for q in questions]
    ranks: dict[str, list[int | None]] = {}
    timings: dict[str, float] = {}
    for name, hybrid in (("vector", False), ("hybrid", True)):
        started = time.perf_counter()
        results = corpus.search("stdlib", queries, k=5, hybrid=hybrid)
        timings[name] = time.perf_counter() - started
        ranks[name] = [rank_of([h.path for h in hits], q["answers"], "stdlib/") for hits, q in zip(results, questions)]
    row = corpus.db.require_collection("stdlib")
    with corpus.db.engine.connect() as conn:
        keyword = []
        for q in questions:
            ids = fulltext.search(conn, row.id, q["q"], 5)
            records = corpus.db.chunks(ids)
            keyword.append(rank_of([records[i].path for i in ids], q["answers"], "stdlib/"))
    ranks["bm25"] = keyword

    def summary(r: list[int | None]) -> dict:
        n = len(r)
        return {"hit@1": sum(x == 1 for x in r) / n, "hit@5": sum(x is not None for x in r) / n,
                "mrr@5": sum(1 / x for x in r if x) / n}

    misses = {name: [q["q"] for q, x in zip(questions, r) if x is None] for name, r in ranks.items()}
    return {
        "modules": len(spec["modules"]), "questions": len(questions), "documents": len(report.documents),
        "chunks": report.chunks_total,
        "ingest_seconds": ingest_s, "ingest_chunks_per_s": report.chunks_total / ingest_s,
        "encode_only_seconds": encode_s, "encode_only_chunks_per_s": len(texts) / encode_s,
        "reingest_unchanged_seconds": reingest_s,
        "scores": {name: summary(r) for name, r in ranks.items()},
        "search_seconds_all_questions": timings, "misses": misses,
    }


def _all_chunks(corpus):
    from sqlalchemy import select

    from retrieval.tables import ChunkRow

    with corpus.db.session() as s:
        return list(s.execute(select(ChunkRow.path, ChunkRow.text).order_by(ChunkRow.id)))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def latency(n_chunks: int, embedder, work: Path, repeats: int = 100) -> dict:
    from retrieval.chunking import Chunk
    from retrieval.index import IndexParams, VectorIndex
    from retrieval.tables import NewDocument

    dim = embedder.dim
    rng = np.random.default_rng(0)
    # Real embeddings are clustered (topics), which is what HNSW relies on; uniform random unit vectors are its
    # worst case. Synthetic vectors: 2,000 random topic centres, each vector a centre plus noise of equal norm.
    centres = _unit(rng.standard_normal((2000, dim)).astype(np.float32))
    vectors = _unit(centres[rng.integers(0, 2000, n_chunks)]
                    + rng.standard_normal((n_chunks, dim)).astype(np.float32) / np.sqrt(dim))
    queries = _unit(centres[rng.integers(0, 2000, repeats)]
                    + rng.standard_normal((repeats, dim)).astype(np.float32) / np.sqrt(dim))
    ids = np.arange(1, n_chunks + 1, dtype=np.int64)
    out: dict = {"chunks": n_chunks, "dim": dim, "repeats": repeats}

    exact = VectorIndex(dim)  # the default: exact below IndexParams.hnsw_threshold
    exact.add(ids, vectors)
    started = time.perf_counter()
    hnsw = VectorIndex(dim, IndexParams(hnsw_threshold=0))
    hnsw.add(ids, vectors)
    out["hnsw_build_seconds"] = time.perf_counter() - started
    assert exact.kind == "flat" and hnsw.kind == "hnsw"

    out["faiss_flat_omp_all_threads_ms"] = _median_ms(  # what a plain index.search does: the OpenMP team
        lambda i: exact._index.search(queries[i:i + 1], 10), repeats)

    out["numpy_bruteforce_ms"] = _median_ms(
        lambda i: np.argpartition(-(vectors @ queries[i]), 10)[:10], repeats)
    out["faiss_flat_ms"] = _median_ms(lambda i: exact.search(queries[i:i + 1], 10), repeats)
    out["faiss_hnsw_ms"] = _median_ms(lambda i: hnsw.search(queries[i:i + 1], 10), repeats)
    _, truth = exact.search(queries, 10)
    _, approx = hnsw.search(queries, 10)
    out["hnsw_recall@10"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth.tolist(),
                                                                                     approx.tolist())]))

    # End to end: the same vectors as chunks of a real collection (database rows, FTS5, FAISS file).
    # Texts: words of a 20,000-word vocabulary drawn with Zipf-like frequencies, as in natural text.
    vocabulary = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 10)))
                           for _ in range(20_000)])
    weights = 1.0 / np.arange(1, len(vocabulary) + 1)
    weights /= weights.sum()
    corpus = make_corpus(work / "latency", embedder)
    row = corpus.db.create_collection("synthetic", embedder.name, dim)
    started = time.perf_counter()
    per_doc = 100
    for begin in range(0, n_chunks, 10_000):
        docs = []
        for d in range(begin, min(begin + 10_000, n_chunks), per_doc):
            n = min(per_doc, n_chunks - d)
            chunks = [Chunk(" ".join(rng.choice(vocabulary, 60, p=weights)), 0, 1, 1, 1, 60) for _ in range(n)]
            docs.append(NewDocument(origin="synthetic", relpath=f"doc{d}.txt", path=f"doc{d}.txt",
                                    source_type="file", kind="prose", size=1, mtime_ns=0, sha256="0" * 64,
                                    text="", chunks=chunks, vectors=vectors[d:d + n], replaces=None))
        corpus.db.write_documents(row.id, docs)
    out["db_write_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    corpus.search("synthetic", "warm up the index", k=5)  # loads: builds the index from the stored vectors
    out["first_search_builds_index_seconds"] = time.perf_counter() - started
    questions = [" ".join(rng.choice(vocabulary, 8, p=weights)) for _ in range(repeats)]
    out["embed_query_ms"] = _median_ms(lambda i: embedder.embed([questions[i]]), repeats)
    out["corpus_search_ms"] = _median_ms(lambda i: corpus.search("synthetic", questions[i], k=5), repeats)
    out["corpus_search_hybrid_ms"] = _median_ms(
        lambda i: corpus.search("synthetic", questions[i], k=5, hybrid=True), repeats)
    # The same searches with the query vectors computed beforehand: what retrieval adds to the model's time
    # (FAISS, SQLite fetch, keyword search, fusion), free of the noise of a busy CPU on the model.
    pre = _Precomputed(embedder, questions)
    corpus._embedder = pre
    out["search_preembedded_ms"] = _median_ms(lambda i: corpus.search("synthetic", questions[i], k=5), repeats)
    out["search_hybrid_preembedded_ms"] = _median_ms(
        lambda i: corpus.search("synthetic", questions[i], k=5, hybrid=True), repeats)
    from retrieval import fulltext

    with corpus.db.engine.connect() as conn:
        out["keyword_search_ms"] = _median_ms(lambda i: fulltext.search(conn, row.id, questions[i], 50), repeats)
    out["index_kind"] = corpus._cached_index(row).kind
    return out


class _Precomputed:
    """An embedder that returns vectors computed beforehand (same name and dim as the real one)."""

    def __init__(self, embedder, texts: list[str]) -> None:
        self.name, self.dim = embedder.name, embedder.dim
        self._vectors = dict(zip(texts, embedder.embed(texts)))

    def embed(self, texts, progress=None) -> np.ndarray:
        return np.stack([self._vectors[t] for t in texts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality", action="store_true", help="only the stdlib quality and ingestion part")
    parser.add_argument("--latency", action="store_true", help="only the 100k-chunk latency part")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="CPython's Lib/ folder (default: this interpreter's)")
    parser.add_argument("--chunks", type=int, default=100_000, help="synthetic chunks for the latency part")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    both = not (args.quality or args.latency)

    from retrieval.embeddings import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder()
    embedder.embed(["warm up"])
    import faiss
    import torch

    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
                     "python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
                     "torch_threads": torch.get_num_threads(), "stdlib": str(args.stdlib),
                     "command": "python " + " ".join(sys.argv),
                     "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="tpa-retrieval-bench-") as tmp:
        work = Path(tmp)
        if args.quality or both:
            results["quality"] = quality(args.stdlib, embedder, work)
        if args.latency or both:
            results["latency"] = latency(args.chunks, embedder, work)
    results["load_average_end"] = os.getloadavg()  # the CPU is shared: other work slows the model most
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print()
    _table(results)


def _table(results: dict) -> None:
    q = results.get("quality")
    if q:
        print(f"stdlib: {q['modules']} modules, {q['chunks']} chunks, {q['questions']} questions")
        print(f"{'ranking':10} {'hit@1':>6} {'hit@5':>6} {'MRR@5':>6}")
        for name, s in q["scores"].items():
            print(f"{name:10} {s['hit@1']:6.3f} {s['hit@5']:6.3f} {s['mrr@5']:6.3f}")
        print(f"ingest: {q['ingest_chunks_per_s']:.1f} chunks/s end to end, encode alone "
              f"{q['encode_only_chunks_per_s']:.1f} chunks/s; "
              f"unchanged re-ingest {q['reingest_unchanged_seconds']:.2f} s")
    lat = results.get("latency")
    if lat:
        print(f"latency at {lat['chunks']} chunks (median / p95 ms): numpy {lat['numpy_bruteforce_ms'][0]:.2f}/"
              f"{lat['numpy_bruteforce_ms'][1]:.2f}, flat {lat['faiss_flat_ms'][0]:.2f}/{lat['faiss_flat_ms'][1]:.2f}, "
              f"hnsw {lat['faiss_hnsw_ms'][0]:.2f}/{lat['faiss_hnsw_ms'][1]:.2f} (recall@10 "
              f"{lat['hnsw_recall@10']:.3f}), Corpus.search {lat['corpus_search_ms'][0]:.1f}/"
              f"{lat['corpus_search_ms'][1]:.1f}, hybrid {lat['corpus_search_hybrid_ms'][0]:.1f}/"
              f"{lat['corpus_search_hybrid_ms'][1]:.1f}, query embedding {lat['embed_query_ms'][0]:.1f}")
        print(f"without the model: search {lat['search_preembedded_ms'][0]:.2f}/{lat['search_preembedded_ms'][1]:.2f}, "
              f"hybrid {lat['search_hybrid_preembedded_ms'][0]:.2f}/{lat['search_hybrid_preembedded_ms'][1]:.2f}, "
              f"keyword search alone {lat['keyword_search_ms'][0]:.2f}/{lat['keyword_search_ms'][1]:.2f}")


if __name__ == "__main__":
    main()
