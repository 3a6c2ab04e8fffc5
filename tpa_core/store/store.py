"""`FactorStore`: prefix pages of factor caches, persisted as safetensors blobs and indexed in SQL.

See `tpa_core.store` (the package docstring) for the API and docs/store.md for what the store guarantees.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, delete, exists, select, update

from tpa_core.store import blobs as blobfmt
from tpa_core.store import maintenance
from tpa_core.store.db import bump, chunks, ensure_counters, insert_ignore
from tpa_core.store.errors import PageCorrupt, StoreError
from tpa_core.store.eviction import Budget, admits, evict, usage
from tpa_core.store.keys import FORMAT_VERSION, PAGE_TOKENS, ExtraValue, canonical_json, namespace_key, page_key
from tpa_core.store.reconcile import ReconcileReport, drop_stale_pending, reconcile, writer_alive, writer_id
from tpa_core.store.records import REF_COLUMNS, PageRef, StoreStats, VerifyReport
from tpa_core.store.tables import (
    PENDING,
    READY,
    Entry,
    Link,
    Namespace,
    Quarantined,
    create_tables,
)
from tpa_core.store.transfer import check_fits, load_chain, page_tensors

if TYPE_CHECKING:
    from torch import Tensor

    from tpa_core.cache import FactorCache

log = logging.getLogger(__name__)

# Config fields that shape RoPE; they also go into the namespace on their own, so the key names them explicitly.
_ROPE_FIELDS = ("head_dim", "max_position_embeddings")


def _numerics(dtype_name: str) -> str:
    """`tpa_core.model.numerics_tag` of a factor dtype named like "bfloat16" ("" for a name torch does not know)."""
    import torch

    from tpa_core.model import numerics_tag

    dtype = getattr(torch, dtype_name, None)
    return numerics_tag(dtype) if isinstance(dtype, torch.dtype) else ""


@dataclass
class SessionCounters:
    """What this process did (the persistent counters add up all processes)."""

    hits: int = 0
    misses: int = 0
    tokens_reused: int = 0
    tokens_requested: int = 0
    pages_written: int = 0
    rejected: int = 0
    corrupt: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


def _ids(token_ids: Sequence[int] | Any) -> list[int]:
    return [int(t) for t in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids)]


def _config_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise StoreError(f"namespace_for needs the model config (TPAConfig or a mapping), got {type(config).__name__}")


class FactorStore:
    """The persisted factor-cache store. Make one with `FactorStore.open(engine, blobs_dir, budget_bytes)`."""

    def __init__(self, engine: Engine, blobs_dir: Path, budget: Budget, *, io_threads: int | None = None) -> None:
        self.engine = engine
        self.blobs_dir = Path(blobs_dir)
        self.budget = budget
        self.io_threads = io_threads  # pages read or written at once; None: torch's thread count
        self.session = SessionCounters()
        self._writer = writer_id()
        self._layouts: dict[str, dict[str, list] | None] = {}

    # ----- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        engine: Engine,
        blobs_dir: str | Path,
        budget_bytes: int,
        *,
        high_watermark: float = 0.9,
        low_watermark: float = 0.7,
        protected_share: float = 0.8,
        reconcile_on_open: bool = True,
        io_threads: int | None = None,
    ) -> FactorStore:
        """Open (and create where missing) the store: its tables on `engine`, its blobs under `blobs_dir`.

        Pages of an earlier blob format are dropped (they are recomputed when next needed), then the index is
        reconciled with the folder (crashed writes, orphan files, missing files). `io_threads`: pages read
        or written at once (default: as many as torch computes with)."""
        budget = Budget(int(budget_bytes), high_watermark, low_watermark, protected_share)
        store = cls(engine, Path(blobs_dir), budget, io_threads=io_threads)
        store.blobs_dir.mkdir(parents=True, exist_ok=True)
        create_tables(engine)
        with engine.begin() as conn:
            ensure_counters(conn)
        maintenance.drop_other_formats(engine, store.blobs_dir, FORMAT_VERSION)
        if reconcile_on_open:
            store.reconcile()
        return store

    def _io_threads(self) -> int:
        if self.io_threads is not None:
            return max(1, int(self.io_threads))
        import torch

        return max(1, torch.get_num_threads())

    def reconcile(self) -> ReconcileReport:
        """Repair the index and the folder after crashes (see `tpa_core.store.reconcile`)."""
        return reconcile(self.engine, self.blobs_dir, self._quarantine)

    # ----- namespaces ------------------------------------------------------------------------------------------
    def namespace_for(self, model: Any, config: Any = None, dtype: Any = None) -> str:
        """The namespace key for a model and the factor dtype of its cache; registers it in the index.

        `model` is a loaded model (anything with `.fingerprint` and `.config`) or a fingerprint string, then
        with `config` (a TPAConfig or its dict). `dtype` is the cache's dtype (torch.float32, "bfloat16"...;
        default: the model's `cache_dtype`, else its `dtype`).
        """
        fingerprint = model if isinstance(model, str) else getattr(model, "fingerprint", None)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise StoreError("namespace_for needs a model fingerprint: a loaded model or a non-empty string")
        config = config if config is not None else getattr(model, "config", None)
        if config is None:
            raise StoreError("namespace_for needs the model config (pass config=... with a fingerprint string)")
        if dtype is None:
            dtype = getattr(model, "cache_dtype", None) or getattr(model, "dtype", None)
        if dtype is None:
            raise StoreError("namespace_for needs the cache's factor dtype (dtype=torch.float32, ...)")
        cfg = _config_dict(config)
        rope = {k: v for k, v in sorted(cfg.items()) if k.startswith("rope") or k in _ROPE_FIELDS}
        dtype_name = str(dtype).removeprefix("torch.")
        key = namespace_key(fingerprint, dtype_name, rope, format_version=FORMAT_VERSION, config=cfg,
                            numerics=_numerics(dtype_name))
        with self.engine.begin() as conn:
            insert_ignore(conn, Namespace, {
                "key": key, "fingerprint": fingerprint[:256], "dtype": dtype_name, "rope": canonical_json(rope),
                "format_version": FORMAT_VERSION, "layout": None, "created": time.time(),
            })
        return key

    def _layout(self, namespace: str) -> dict[str, list] | None:
        if self._layouts.get(namespace) is None:
            with self.engine.connect() as conn:
                row = conn.execute(select(Namespace.layout).where(Namespace.key == namespace)).first()
            if row is None:
                raise StoreError(f"unknown cache namespace {namespace[:16]}...; get one from namespace_for()")
            self._layouts[namespace] = json.loads(row[0]) if row[0] else None
        return self._layouts[namespace]

    def _check_layout(self, namespace: str, tensors: Mapping[str, Tensor]) -> None:
        """The first page of a namespace fixes its layout; every later page must match it."""
        layout = blobfmt.layout_of(tensors)
        known = self._layout(namespace)
        if known is None:
            with self.engine.begin() as conn:
                conn.execute(update(Namespace).where(Namespace.key == namespace, Namespace.layout.is_(None))
                             .values(layout=canonical_json(layout)))
            self._layouts.pop(namespace, None)
            known = self._layout(namespace)
        if known != json.loads(canonical_json(layout)):
            raise StoreError(f"this cache's factors do not fit namespace {namespace[:16]}... (a different model "
                             f"or dtype?): {sorted(layout.items())[:2]} vs {sorted((known or {}).items())[:2]}")

    # ----- lookup and restore --------------------------------------------------------------------------------
    def prefix_keys(self, namespace: str, token_ids: Sequence[int], *,
                    extras: Mapping[str, ExtraValue] | None = None) -> list[str]:
        """Keys naming `token_ids` as pages: the full pages, then a tail for a partial last page (to pin them)."""
        ids = _ids(token_ids)
        keys: list[str] = []
        parent: str | None = None
        full = len(ids) // PAGE_TOKENS
        for i in range(full):
            parent = page_key(namespace, parent, ids[i * PAGE_TOKENS:(i + 1) * PAGE_TOKENS], extras=extras)
            keys.append(parent)
        if len(ids) % PAGE_TOKENS:
            keys.append(page_key(namespace, parent, ids[full * PAGE_TOKENS:], kind="tail", extras=extras))
        return keys

    def lookup(self, namespace: str, token_ids: Sequence[int], *, limit: int | None = None,
               extras: Mapping[str, ExtraValue] | None = None) -> list[PageRef]:
        """The longest chain of ready pages that covers a prefix of `token_ids` (at most `limit` tokens are
        wanted, so pages starting at or after `limit` are not looked up). The last may be a tail."""
        ids = _ids(token_ids)
        limit = len(ids) if limit is None else max(0, min(limit, len(ids)))
        n_pages = min(len(ids) // PAGE_TOKENS, math.ceil(limit / PAGE_TOKENS))
        keys: list[str] = []
        parent: str | None = None
        for i in range(n_pages):
            parent = page_key(namespace, parent, ids[i * PAGE_TOKENS:(i + 1) * PAGE_TOKENS], extras=extras)
            keys.append(parent)
        found: dict[str, PageRef] = {}
        with self.engine.connect() as conn:
            for batch in chunks(keys):
                for row in conn.execute(select(*REF_COLUMNS).where(Entry.key.in_(batch), Entry.state == READY)):
                    found[row.key] = PageRef(*row)
        chain: list[PageRef] = []
        for key in keys:
            if key not in found:
                break
            chain.append(found[key])
        start = len(chain) * PAGE_TOKENS
        if start < limit:
            tail = self._find_tail(namespace, chain[-1].key if chain else None, ids[start:], extras)
            if tail is not None:
                chain.append(tail)
        return chain

    def _find_tail(self, namespace: str, parent: str | None, rest: list[int],
                   extras: Mapping[str, ExtraValue] | None) -> PageRef | None:
        """The longest ready tail under `parent` whose tokens are a prefix of `rest`."""
        query = select(*REF_COLUMNS).where(Entry.namespace == namespace, Entry.kind == "tail", Entry.state == READY,
                                    Entry.n_tokens <= len(rest),
                                    Entry.parent.is_(None) if parent is None else Entry.parent == parent)
        with self.engine.connect() as conn:
            tails = sorted((PageRef(*r) for r in conn.execute(query)), key=lambda r: -r.n_tokens)
        for ref in tails:
            if page_key(namespace, parent, rest[:ref.n_tokens], kind="tail", extras=extras) == ref.key:
                return ref
        return None

    def restore(self, namespace: str, token_ids: Sequence[int], cache: FactorCache, seq: int = 0, *,
                limit: int | None = None, extras: Mapping[str, ExtraValue] | None = None) -> int:
        """Load the longest cached prefix of `token_ids` into sequence `seq` of `cache` at position 0.

        Returns the number of tokens restored, P: the cache then holds tokens [0, P) and the caller prefills
        `token_ids[P:]` (whatever the sequence held before is dropped, even when nothing is found). At most
        `limit` tokens are restored (default `len(token_ids) - 1`: the last token is always left to prefill,
        since its logits are needed). Pages are read straight into the cache, `io_threads` at once, and
        verified as they stream; the sequence's length covers a page only once all of it checked out. A bad
        page is quarantined (warning) and the restore stops before it - a miss, recomputed by the caller; a
        page evicted since the lookup is a plain miss.
        """
        ids = _ids(token_ids)
        limit = len(ids) - 1 if limit is None else min(limit, len(ids))
        layout = self._layout(namespace)  # also rejects an unknown namespace
        cache.truncate(seq, 0)
        if limit <= 0:
            return 0
        # no layout: no page of this namespace was ever written
        chain = self.lookup(namespace, ids, limit=limit, extras=extras) if layout is not None else []
        if chain:
            check_fits(cache, layout, namespace)
        result = load_chain(self.blobs_dir, chain, layout or {}, cache, seq, limit, threads=self._io_threads())
        if result.bad is not None:
            ref, reason = result.bad
            self.session.corrupt += 1
            self._quarantine(ref.key, reason, checksum=ref.checksum)
        loaded, used = result.tokens, result.used
        asked = math.ceil(limit / PAGE_TOKENS)
        counts = {"hits": len(used), "misses": asked - len(used), "tokens_reused": loaded,
                  "tokens_requested": limit}
        for name, n in counts.items():
            setattr(self.session, name, getattr(self.session, name) + n)
        now = time.time()
        with self.engine.begin() as conn:
            for batch in chunks(used):
                conn.execute(update(Entry).where(Entry.key.in_(batch))
                             .values(hits=Entry.hits + 1, last_access=now))
            bump(conn, counts)
        return loaded

    # ----- save ----------------------------------------------------------------------------------------------
    def save(self, namespace: str, token_ids: Sequence[int], cache: FactorCache, seq: int = 0, *,
             boundaries: Iterable[int] = (), extras: Mapping[str, ExtraValue] | None = None) -> int:
        """Persist the pages of `token_ids` that `cache` (sequence `seq`) holds and the store lacks.

        Full pages are written once (content addressed: pages already there, or being written by another
        process, are skipped); a partial last page is written as a tail, replacing the shorter tails it
        extends. `boundaries` are positions where a prefix is worth keeping on its own even though this
        prompt goes on - typically the end of the document context, before the question: a tail is kept there
        too ("anchored": never replaced, only evicted), so the next question on the same context reuses it.
        Admission control may refuse pages (see `tpa_core.store.eviction`); a refused page ends the save
        (later pages would be unreachable). Returns the number of pages (tails included) this call wrote."""
        ids = _ids(token_ids)
        n = min(len(ids), cache.length(seq))
        if n <= 0:
            return 0
        self._layout(namespace)  # fails early on an unknown namespace
        full = n // PAGE_TOKENS
        pages = self.prefix_keys(namespace, ids[:full * PAGE_TOKENS], extras=extras)
        units: list[tuple[int, int, str, bool]] = [(i * PAGE_TOKENS, (i + 1) * PAGE_TOKENS, key, False)
                                                   for i, key in enumerate(pages)]  # (start, end, key, anchored)
        marks = {int(b) for b in boundaries}
        for end in sorted({b for b in marks if 0 < b <= n} | {n}):
            if end % PAGE_TOKENS == 0:
                continue
            start = end // PAGE_TOKENS * PAGE_TOKENS
            parent = pages[start // PAGE_TOKENS - 1] if start else None
            tail = page_key(namespace, parent, ids[start:end], kind="tail", extras=extras)
            units.append((start, end, tail, end in marks))
        units.sort(key=lambda u: (u[0], u[1] - u[0] < PAGE_TOKENS, u[1]))  # a page's tails right after it
        with self.engine.connect() as conn:
            present = {k: a for batch in chunks([u[2] for u in units]) for k, a in conn.execute(
                select(Entry.key, Entry.anchored).where(Entry.key.in_(batch), Entry.state == READY))}
        claimed: list[tuple[dict[str, Any], Mapping[str, Tensor], dict[str, Any]]] = []  # (row, tensors, meta)
        covered: list[tuple[str | None, list[int], str]] = []  # (parent, tokens, key) of each unit kept
        for start, end, key, anchored in units:
            parent = pages[start // PAGE_TOKENS - 1] if start else None
            kind = "page" if end - start == PAGE_TOKENS else "tail"
            if key not in present:
                tensors = page_tensors(cache, seq, start, end)
                claim = self._claim_page(namespace, key, parent, kind, start, tensors, anchored=anchored)
                if claim == "rejected":
                    break
                if claim != "exists":
                    claimed.append((claim[0], tensors, claim[1]))
            elif anchored and not present[key]:
                with self.engine.begin() as conn:
                    conn.execute(update(Entry).where(Entry.key == key).values(anchored=True))
            covered.append((parent, ids[start:end], key))
        written = self._write_claimed(claimed)
        for parent, tokens, key in covered:
            self._supersede_tails(namespace, parent, tokens, keep=key, extras=extras)
        if present:
            with self.engine.begin() as conn:
                for batch in chunks(sorted(present)):
                    conn.execute(update(Entry).where(Entry.key.in_(batch)).values(last_access=time.time()))
        self.evict()
        return written

    def _claim_page(self, namespace: str, key: str, parent: str | None, kind: str, start: int,
                    tensors: Mapping[str, Tensor], *, anchored: bool = False
                    ) -> tuple[dict[str, Any], dict[str, Any]] | str:
        """Admit and claim one page: returns (its pending row, its header fields), or "exists" (another writer
        has or is writing it) or "rejected" (admission control)."""
        self._check_layout(namespace, tensors)
        n_tokens = next(iter(tensors.values())).shape[0]
        meta = {"namespace": namespace, "key": key, "kind": kind, "start": start, "n_tokens": n_tokens,
                "parent": parent or ""}
        nbytes = blobfmt.page_nbytes(tensors, meta)
        if not admits(self.budget, usage(self.engine), nbytes):
            self.session.rejected += 1
            with self.engine.begin() as conn:
                bump(conn, {"rejected": 1})
            log.info("store: page %s not admitted (the budget is held by warm or pinned pages)", key[:16])
            return "rejected"
        now = time.time()
        row = {"key": key, "namespace": namespace, "parent": parent, "kind": kind, "start": start,
               "n_tokens": n_tokens, "nbytes": nbytes, "path": blobfmt.blob_relpath(namespace, key),
               "checksum": "", "state": PENDING, "writer": self._writer, "created": now, "last_access": now,
               "hits": 0, "pinned": False, "anchored": anchored}
        return (row, meta) if self._claim(row) else "exists"

    def _write_claimed(self, claimed: Sequence[tuple[dict[str, Any], Mapping[str, Tensor], dict[str, Any]]]
                       ) -> int:
        """Write the claimed pages' files, `io_threads` at once (writing, hashing and fsync release the GIL),
        then mark each ready. A page whose write failed loses its claim; the first failure is raised once the
        others are settled. Returns the pages this call made ready."""
        def write(job: tuple[dict[str, Any], Mapping[str, Tensor], dict[str, Any]]) -> str | BaseException:
            row, tensors, meta = job
            try:
                nbytes, checksum = blobfmt.write_page(self.blobs_dir / row["path"], tensors, meta)
            except Exception as exc:  # noqa: BLE001 - settled below, then raised
                return exc
            if nbytes != row["nbytes"]:
                return StoreError(f"page {row['key'][:16]}... came out at {nbytes} bytes, {row['nbytes']} were "
                                  "planned")
            return checksum

        threads = min(self._io_threads(), len(claimed))
        try:
            if threads > 1:
                with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store-write") as pool:
                    outcomes = list(pool.map(write, claimed))
            else:
                outcomes = [write(job) for job in claimed]
        except BaseException as exc:  # noqa: BLE001 - interrupted: give every claim back, with the files
            outcomes = [exc] * len(claimed)
        written = 0
        failure: BaseException | None = None
        for (row, _, _), outcome in zip(claimed, outcomes):
            if isinstance(outcome, BaseException):
                failure = failure or outcome
                self._release_claim(row)
                continue
            written += self._mark_ready(row["key"], outcome)
        if failure is not None:
            raise failure
        return written

    def _release_claim(self, row: dict[str, Any]) -> None:
        """Drop our pending row of a page whose write failed, and whatever reached its final path."""
        (self.blobs_dir / row["path"]).unlink(missing_ok=True)
        with self.engine.begin() as conn:
            conn.execute(delete(Entry).where(Entry.key == row["key"], Entry.state == PENDING,
                                             Entry.writer == self._writer))

    def _mark_ready(self, key: str, checksum: str) -> bool:
        """Turn our pending row of a written page ready (pinned if a link already names it)."""
        has_link = exists().where(Link.key == Entry.key)
        with self.engine.begin() as conn:
            done = conn.execute(update(Entry).where(Entry.key == key, Entry.state == PENDING,
                                                    Entry.writer == self._writer)
                                .values(state=READY, writer=None, checksum=checksum, last_access=time.time(),
                                        pinned=has_link))
            bump(conn, {"pages_written": 1})
        if done.rowcount != 1:  # our claim was taken away (a reconciler thought us dead): the file is an orphan
            log.warning("store: the claim on page %s was lost during its write; it will be rewritten", key[:16])
            return False
        self.session.pages_written += 1
        return True

    def _claim(self, row: dict[str, Any]) -> bool:
        """Insert the pending row; of several writers of one key exactly one gets it. A pending row left by a
        dead writer is cleared and claimed again."""
        for _ in range(2):
            with self.engine.begin() as conn:
                if insert_ignore(conn, Entry, row):
                    return True
            with self.engine.connect() as conn:
                other = conn.execute(select(Entry.state, Entry.writer, Entry.created, Entry.path)
                                     .where(Entry.key == row["key"])).first()
            if other is None:
                continue  # removed meanwhile: try again
            state, writer, created, path = other
            if state != PENDING or writer_alive(writer, created):
                return False
            drop_stale_pending(self.engine, self.blobs_dir, row["key"], writer, path)
        return False

    def _supersede_tails(self, namespace: str, parent: str | None, tokens: list[int], *, keep: str,
                         extras: Mapping[str, ExtraValue] | None) -> None:
        """Remove tails under `parent` whose tokens are a proper prefix of `tokens` (the page or longer tail
        `keep` now covers them); their links move to `keep`. Anchored tails stay."""
        query = select(Entry.key, Entry.path, Entry.n_tokens).where(
            Entry.namespace == namespace, Entry.kind == "tail", Entry.state == READY, Entry.key != keep,
            Entry.anchored.is_(False),
            Entry.n_tokens < len(tokens), Entry.parent.is_(None) if parent is None else Entry.parent == parent)
        with self.engine.connect() as conn:
            tails = conn.execute(query).all()
        for key, path, m in tails:
            if page_key(namespace, parent, tokens[:m], kind="tail", extras=extras) != key:
                continue
            with self.engine.begin() as conn:
                owners = conn.execute(select(Link.owner).where(Link.key == key)).scalars().all()
                for owner in owners:
                    insert_ignore(conn, Link, {"owner": owner, "key": keep})
                if owners:
                    conn.execute(update(Entry).where(Entry.key == keep).values(pinned=True))
                    conn.execute(delete(Link).where(Link.key == key))
                conn.execute(update(Entry).where(Entry.key == key).values(pinned=False))
            self._remove(key, path, pinned_ok=True)

    # ----- entries of other kinds (`tpa_core.store.chunks`) --------------------------------------------------
    def write_entry(self, namespace: str, key: str, kind: str, start: int, tensors: Mapping[str, Tensor]) -> str:
        """Write one entry that is not a prefix page (`{name: [T, ...]}`, contiguous CPU tensors; no parent, so
        always a leaf for eviction) through the pages' path: layout check, admission, claim, atomic write.
        Returns "written", "exists" (another writer has or is writing it) or "rejected" (admission control)."""
        claim = self._claim_page(namespace, key, None, kind, start, tensors)
        if isinstance(claim, str):
            return claim
        return "written" if self._write_claimed([(claim[0], tensors, claim[1])]) else "exists"

    def read_entry(self, ref: PageRef) -> dict[str, Tensor] | None:
        """The verified tensors of ready entry `ref` (`{name: [n_tokens, ...]}` on the CPU), its hit counted;
        None when its file is gone (evicted meanwhile) or it failed verification (then it is quarantined, with
        a warning)."""
        layout = self._layout(ref.namespace)
        if layout is None:
            return None
        try:
            tensors = blobfmt.read_page(self.blobs_dir / ref.path, nbytes=ref.nbytes, checksum=ref.checksum,
                                        expect=ref.expect(), layout=layout)
        except FileNotFoundError:
            return None
        except PageCorrupt as exc:
            self.session.corrupt += 1
            self._quarantine(ref.key, str(exc) or "corrupt", checksum=ref.checksum)
            return None
        with self.engine.begin() as conn:
            conn.execute(update(Entry).where(Entry.key == ref.key)
                         .values(hits=Entry.hits + 1, last_access=time.time()))
        return tensors

    # ----- removal, quarantine, eviction ---------------------------------------------------------------------
    def _remove(self, key: str, path: str, *, pinned_ok: bool = False) -> bool:
        """Delete a ready entry, then its file (a crash in between leaves an orphan file: reconciled)."""
        cond = [Entry.key == key, Entry.state == READY]
        if not pinned_ok:
            cond.append(Entry.pinned.is_(False))
        with self.engine.begin() as conn:
            gone = conn.execute(delete(Entry).where(*cond)).rowcount == 1
        if gone:
            (self.blobs_dir / path).unlink(missing_ok=True)
        return gone

    def _quarantine(self, key: str, reason: str, *, checksum: str | None = None) -> None:
        """Move a bad page's file to quarantine/, drop its entry, record why, warn. With `checksum`, only if the
        entry still holds that checksum (the page was not rewritten since it was found bad)."""
        cond = [Entry.key == key, Entry.state == READY]
        if checksum is not None:
            cond.append(Entry.checksum == checksum)
        with self.engine.connect() as conn:
            row = conn.execute(select(Entry.namespace, Entry.path, Entry.checksum).where(*cond)).first()
        if row is None:
            return
        namespace, path, found = row
        qrel: str | None = f"{blobfmt.QUARANTINE_DIR}/{key}.{time.time_ns()}{blobfmt.BLOB_SUFFIX}"
        (self.blobs_dir / blobfmt.QUARANTINE_DIR).mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.blobs_dir / path, self.blobs_dir / qrel)
        except FileNotFoundError:
            qrel = None
        with self.engine.begin() as conn:
            conn.execute(delete(Entry).where(Entry.key == key, Entry.state == READY, Entry.checksum == found))
            conn.execute(Quarantined.__table__.insert().values(key=key, namespace=namespace, path=qrel,
                                                               reason=reason[:2000], at=time.time()))
        log.warning("store: page %s failed verification (%s); quarantined%s - it is treated as a miss and "
                    "recomputed", key[:16], reason, f" as {qrel}" if qrel else "")

    def evict(self, *, force: bool = False) -> tuple[int, int]:
        """Apply the budget now (see `tpa_core.store.eviction`). Returns (entries evicted, bytes freed)."""
        count, freed = evict(self.engine, self.budget, self._remove, force=force)
        if count:
            with self.engine.begin() as conn:
                bump(conn, {"evicted": count})
        return count, freed

    # ----- links (pins) --------------------------------------------------------------------------------------
    def pin(self, keys: Iterable[str], owner: str) -> int:
        """Link `owner` (e.g. "session:42", "document:<sha>") to entries; linked entries are never evicted.
        Keys may name pages not written yet: they are pinned when they arrive. Returns the links added."""
        keys = sorted(set(keys))
        if not owner:
            raise StoreError("pin needs a non-empty owner name")
        added = 0
        with self.engine.begin() as conn:
            for key in keys:
                added += insert_ignore(conn, Link, {"owner": owner, "key": key})
            for batch in chunks(keys):
                conn.execute(update(Entry).where(Entry.key.in_(batch)).values(pinned=True))
        return added

    def unpin(self, owner: str) -> int:
        """Drop every link of `owner`; entries no other owner holds become evictable. Returns links removed."""
        has_link = exists().where(Link.key == Entry.key)
        with self.engine.begin() as conn:
            keys = conn.execute(select(Link.key).where(Link.owner == owner)).scalars().all()
            conn.execute(delete(Link).where(Link.owner == owner))
            for batch in chunks(keys):
                conn.execute(update(Entry).where(Entry.key.in_(batch)).values(pinned=has_link))
        return len(keys)

    def owners(self, key: str) -> list[str]:
        with self.engine.connect() as conn:
            return sorted(conn.execute(select(Link.owner).where(Link.key == key)).scalars())

    # ----- reporting and maintenance (tpa_core.store.maintenance) ----------------------------------------------
    def stats(self) -> StoreStats:
        """Entries, bytes, pins, quarantine and the lifetime counters (hits, misses, hit rate...)."""
        return maintenance.collect_stats(self.engine, self.budget)

    def verify(self) -> VerifyReport:
        """Read and check every ready entry; bad ones are quarantined."""
        def check(ref: PageRef) -> None:
            layout = self._layout(ref.namespace)
            if layout is None:
                raise PageCorrupt("its namespace has no layout (no page of it was ever written by this store)")
            blobfmt.read_page(self.blobs_dir / ref.path, nbytes=ref.nbytes, checksum=ref.checksum,
                              expect=ref.expect(), layout=layout)

        return maintenance.verify_all(self.engine, check,
                                      lambda ref, reason: self._quarantine(ref.key, reason, checksum=ref.checksum))

    def purge_quarantine(self) -> int:
        """Delete quarantined files and their records. Returns how many."""
        return maintenance.purge_quarantine(self.engine, self.blobs_dir)

    def gc(self) -> dict[str, int]:
        """Reconcile, apply the budget, purge the quarantine, drop empty folders."""
        report = self.reconcile()
        evicted, freed = self.evict()
        purged = self.purge_quarantine()
        maintenance.drop_empty_folders(self.blobs_dir)
        return {**dataclasses.asdict(report), "evicted": evicted, "freed_bytes": freed, "quarantine_purged": purged}

    def clear(self, *, include_pinned: bool = False) -> int:
        """Delete every ready entry (pinned ones and their links too with `include_pinned`, which also resets
        the counters). Returns the entries deleted."""
        return maintenance.clear(self.engine, self.blobs_dir,
                                 lambda key, path, pinned_ok: self._remove(key, path, pinned_ok=pinned_ok),
                                 include_pinned=include_pinned)
