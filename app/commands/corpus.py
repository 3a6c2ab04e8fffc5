"""Corpus commands: `tpa-rag ingest`, `tpa-rag search`, `tpa-rag collections list|delete`.

    tpa-rag ingest --collection NAME [--json] [--encode] PATH...
    tpa-rag search --collection NAME [-k K] [--hybrid] [--json] QUERY...
    tpa-rag collections list [--json]
    tpa-rag collections delete NAME [--json]

`--json` shapes:
    ingest:  {"collection", "documents": [{"path", "chunks"}], "skipped": [{"path", "reason"}], "chunks_total",
              "seconds"[, "encode": {"chunks", "cached", "to_encode", "bytes_needed", "budget_bytes", "encoded",
              "rejected"}]}
    search:  one list per query, each a list of hits {"path", "score", "start_line", "end_line", "text"}
    collections list:   [{"name", "documents", "chunks", "embedding_model", "created_at"}]
    collections delete: {"deleted": NAME}
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from app.commands.progress import IngestProgressBar
from app.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    ingest = subparsers.add_parser(
        "ingest", help="add files, folders, .zip archives or git repositories to a collection",
        description="Ingest PATHs into a collection (created if needed). Unchanged files are not re-embedded; "
                    "files gone from a re-ingested folder are removed. Skipped files are listed with the reason.")
    ingest.add_argument("--collection", required=True, metavar="NAME", help="the collection to add to")
    ingest.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    ingest.add_argument("--encode", action="store_true",
                        help="then encode the chunk caches of new or changed chunks (for --chunk-reuse; resumable: "
                             "stored ones are skipped; says the bytes it needs against the cache budget first)")
    ingest.add_argument("paths", nargs="+", metavar="PATH", help="files, folders, .zip archives, git repositories")
    ingest.set_defaults(handler=cmd_ingest)

    search = subparsers.add_parser(
        "search", help="find the chunks of a collection closest to one or more questions",
        description="Search a collection; several QUERYs are answered in one call (the model loads once).")
    search.add_argument("--collection", required=True, metavar="NAME", help="the collection to search")
    search.add_argument("-k", type=int, default=None, metavar="K", help="hits per query (default from settings, 5)")
    search.add_argument("--hybrid", action="store_true",
                        help="fuse vector search with keyword (BM25) search by reciprocal rank fusion")
    search.add_argument("--json", action="store_true", help="print a JSON list (one list of hits per query)")
    search.add_argument("queries", nargs="+", metavar="QUERY", help="a question (quote it)")
    search.set_defaults(handler=cmd_search)

    collections = subparsers.add_parser("collections", help="list or delete collections")
    sub = collections.add_subparsers(dest="collections_command", metavar="ACTION")
    listing = sub.add_parser("list", help="collections with their document and chunk counts")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=cmd_collections_list)
    remove = sub.add_parser("delete", help="delete a collection, its documents and its index")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--json", action="store_true", help="machine-readable output")
    remove.set_defaults(handler=cmd_collections_delete)
    collections.set_defaults(handler=lambda args, settings: _usage(collections))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def make_corpus(settings: Settings, with_embedder: bool = True):
    """The Corpus on the settings' database and data folder (the embedder is loaded only when first used)."""
    from app.database import make_engine
    from retrieval import Corpus, SentenceTransformerEmbedder

    embedder = None
    if with_embedder:
        device = "cuda" if settings.device == "cuda" else "cpu"
        embedder = SentenceTransformerEmbedder(settings.embedding_model or None, device=device)
    return Corpus(make_engine(settings.db_url), settings.indexes_dir, settings.uploads_dir, embedder=embedder,
                  limits=settings.ingest_limits())


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    if any(not path.strip() for path in args.paths):
        from app.errors import AppError

        raise AppError("an empty PATH was given (it would mean the current folder; write . if you mean that)")
    corpus = make_corpus(settings)
    bar = IngestProgressBar()
    try:
        report = corpus.ingest(args.collection, args.paths, progress=bar)
    finally:
        bar.close()
    encoded = _encode_chunks(args.collection, settings, quiet=args.json) if args.encode else None
    if args.json:
        body = report.to_json()
        if encoded is not None:
            body["encode"] = encoded
        print(json.dumps(body, ensure_ascii=False))
        return 0
    by_status: dict[str, int] = {}
    for doc in report.documents:
        by_status[doc.status] = by_status.get(doc.status, 0) + 1
    counts = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items())) or "none"
    print(f"{report.collection}: {len(report.documents)} documents ({counts}), {report.chunks_total} chunks "
          f"({report.chunks_embedded} embedded now) in {report.seconds:.1f} s")
    for path in report.removed:
        print(f"  removed  {path}")
    for item in report.warnings:
        print(f"  warning  {item.path}: {item.reason}")
    for item in report.skipped:
        print(f"  skipped  {item.path}: {item.reason}")
    return 0


def _encode_chunks(collection: str, settings: Settings, *, quiet: bool) -> dict:
    """`ingest --encode`: the collection's missing chunk caches, with the plan on stderr and a progress bar."""
    from app.service import ChatService

    bar: dict = {}

    def on_plan(plan) -> None:  # app.chunk_reuse.EncodePlan
        print(f"encoding {plan.to_encode} chunk caches ({plan.cached} of {plan.chunks} chunks already stored): "
              f"{plan.bytes_needed / 1024**2:,.1f} MiB against a cache budget of "
              f"{plan.budget_bytes / 1024**2:,.0f} MiB", file=sys.stderr)
        if plan.bytes_needed > plan.budget_bytes:
            print("tpa-rag: warning: that is more than the budget; the least used caches will be evicted or new "
                  "ones refused (raise TPA_RAG_CACHE_BUDGET_BYTES)", file=sys.stderr)
        if sys.stderr.isatty() and plan.to_encode:
            from tqdm import tqdm

            bar["tqdm"] = tqdm(total=plan.to_encode, unit="chunk", file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int, path: str) -> None:
        if "tqdm" in bar:
            bar["tqdm"].n = done
            bar["tqdm"].set_postfix_str(path[-40:], refresh=False)
            bar["tqdm"].refresh()

    service = ChatService(settings)
    try:
        summary = service.encode_chunks(collection, progress=progress, on_plan=on_plan)
    finally:
        if "tqdm" in bar:
            bar["tqdm"].close()
        service.close()
    if not quiet:
        print(f"chunk caches: {summary['encoded']} encoded, {summary['cached']} already stored"
              + (f", {summary['rejected']} refused by the cache budget" if summary["rejected"] else ""))
    return summary


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    corpus = make_corpus(settings)
    k = args.k if args.k is not None else settings.top_k
    started = time.perf_counter()
    results = corpus.search(args.collection, args.queries, k=k, hybrid=args.hybrid)
    if args.json:
        print(json.dumps([[hit.to_json() for hit in hits] for hits in results], ensure_ascii=False))
        return 0
    for query, hits in zip(args.queries, results):
        print(f"? {query}")
        if not hits:
            print("  (no hits: the collection is empty)")
        for rank, hit in enumerate(hits, start=1):
            print(f"  {rank}. {hit.path}:{hit.start_line}-{hit.end_line}  score {hit.score:.4f}")
            lines = hit.text.splitlines()
            for line in lines[:3]:
                print(f"       {line[:100]}")
            if len(lines) > 3:
                print(f"       ... ({len(lines) - 3} more lines)")
    print(f"({len(args.queries)} queries in {time.perf_counter() - started:.2f} s)", file=sys.stderr)
    return 0


def cmd_collections_list(args: argparse.Namespace, settings: Settings) -> int:
    collections = make_corpus(settings, with_embedder=False).list_collections()
    if args.json:
        print(json.dumps([c.to_json() for c in collections], ensure_ascii=False))
        return 0
    if not collections:
        print("no collections yet: `tpa-rag ingest --collection NAME PATH...` makes one")
    for c in collections:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.created_at))
        print(f"{c.name}\t{c.documents} documents\t{c.chunks} chunks\t{c.embedding_model}\tcreated {created}")
    return 0


def cmd_collections_delete(args: argparse.Namespace, settings: Settings) -> int:
    make_corpus(settings, with_embedder=False).delete_collection(args.name)
    if args.json:
        print(json.dumps({"deleted": args.name}))
    else:
        print(f"deleted collection {args.name}")
    return 0
