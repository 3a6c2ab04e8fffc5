"""`tpa-rag cache stats|verify|gc|clear [--json]`: the persisted factor-cache store from the command line.

    tpa-rag cache stats  [--json]   entries (chunk caches among them), bytes on disk, budget, hits, misses, hit
                                    rate, pinned, quarantined
    tpa-rag cache verify [--json]   read and check every ready page; bad ones are quarantined
                                    --json: {"entries", "ok", "corrupt", "quarantined", "bytes"}
    tpa-rag cache gc     [--json]   repair after crashes, apply the budget, purge the quarantine
    tpa-rag cache clear  [--all] [--json]   delete the unpinned pages (--all: pinned ones and the counters too)

`verify` exits 1 when it found corrupt pages (they are quarantined by then), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from app.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    cache = subparsers.add_parser("cache", help="inspect and maintain the persisted factor cache",
                                  description="The factor-cache store under <data-dir>/blobs and its index.")
    sub = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    for name, handler, text in (
        ("stats", cmd_stats, "entries, bytes on disk, hit rate"),
        ("verify", cmd_verify, "check every page (checksum, header, shapes, dtypes); quarantine bad ones"),
        ("gc", cmd_gc, "reconcile after crashes, evict down to the budget, purge quarantined files"),
        ("clear", cmd_clear, "delete the cached pages (pinned ones are kept unless --all)"),
    ):
        parser = sub.add_parser(name, help=text, description=text)
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "clear":
            parser.add_argument("--all", action="store_true",
                                help="also delete pinned pages and their links, and reset the counters")
        parser.set_defaults(handler=handler)
    cache.set_defaults(handler=lambda args, settings: _usage(cache))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _open(settings: Settings):
    from app.database import make_engine
    from tpa_core.store import FactorStore

    return FactorStore.open(make_engine(settings.db_url), settings.blobs_dir, settings.cache_budget_bytes)


def _print(args: argparse.Namespace, data: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(data, sort_keys=False))
    else:
        print("\n".join(lines))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    from tpa_core.store.chunks import ChunkCaches

    store = _open(settings)
    stats = store.stats().to_dict()
    chunks = stats["chunk_caches"] = ChunkCaches(store).stats()
    _print(args, stats, [
        f"entries      {stats['entries']} ({stats['pending']} being written)",
        f"chunk caches {chunks['entries']} of them ({_mib(chunks['bytes'])}, {chunks['pinned']} pinned)",
        f"on disk      {_mib(stats['bytes'])} of a {_mib(stats['budget_bytes'])} budget "
        f"({_mib(stats['pinned_bytes'])} pinned)",
        f"hit rate     {stats['hit_rate']:.1%} ({stats['hits']} pages reused, {stats['misses']} missed; "
        f"{stats['tokens_reused']} of {stats['tokens_requested']} prompt tokens)",
        f"written      {stats['pages_written']} pages, {stats['evicted']} evicted, {stats['rejected']} not admitted",
        f"quarantined  {stats['quarantined']}",
        f"namespaces   {stats['namespaces']}",
    ])
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    report = _open(settings).verify().to_dict()
    _print(args, report, [
        f"checked {report['entries']} pages: {report['ok']} ok, {report['corrupt']} corrupt (quarantined), "
        f"{_mib(report['bytes'])} verified; {report['quarantined']} in quarantine",
    ])
    return 1 if report["corrupt"] else 0


def cmd_gc(args: argparse.Namespace, settings: Settings) -> int:
    done = _open(settings).gc()
    _print(args, done, [f"{name.replace('_', ' ')}: {value}" for name, value in done.items()])
    return 0


def cmd_clear(args: argparse.Namespace, settings: Settings) -> int:
    removed = _open(settings).clear(include_pinned=args.all)
    _print(args, {"removed": removed}, [f"removed {removed} pages"])
    return 0
