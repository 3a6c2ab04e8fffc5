"""Restore the cache of a retrieval-mode prompt: exact prefix pages first, then chunk caches, then recompute.

Runs on the model worker (`app.service`). The order of preference, token by token: exact prefix pages (bit-exact,
cheapest); an assembled prefix an earlier turn of the session saved (its follow-up reuses all of it); chunk caches
of the retrieved chunks, moved into place (`tpa_core.assembly.place`), the headers between them and each chunk's
first `boundary_tokens` computed against the assembled cache and, with `recompute_ratio`, the share of chunk
tokens whose factors deviate most recomputed layer by layer. The caller prefills the rest (the question).

A cache assembled from chunk caches is approximate: the store keeps its pages under extras that name the
setting (`ReuseSetting.extras`), a key family exact lookups never see.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.asking import ChunkSpan

log = logging.getLogger(__name__)


def reuse_pays_on(device: Any) -> bool:
    """Whether chunk reuse is the default on `device` (a `torch.device`), where neither the ask nor the settings
    decide: on the CPU, assembling a new question's context from chunk caches takes a fifth of a full prefill; on
    CUDA, a full prefill of the same prompt is faster than the many small steps of assembling it (benchmarks/
    RESULTS.md, "Chunk reuse"), so exact prefix reuse alone is the default there."""
    return device.type == "cpu"


@dataclass(frozen=True)
class ReuseSetting:
    """How chunks are joined: the first `boundary_tokens` of each recomputed, then the `recompute_ratio` share
    of the rest that deviates most."""

    boundary_tokens: int = 16
    recompute_ratio: float = 0.0

    def extras(self) -> dict[str, str]:
        """The store extras of pages saved from a cache assembled this way."""
        return {"assembled": f"k={self.boundary_tokens};r={self.recompute_ratio:g}"}


@dataclass
class Restored:
    """Where the cached part of a prompt came from (token counts) and the chunk caches it used."""

    reused_tokens: int = 0  # exact prefix pages
    exact_tokens: int = 0  # the cache's leading tokens computed exactly (exact pages or a plain prefill)
    chunk_tokens: int = 0  # chunk caches, or an assembled prefix of an earlier turn
    encoded_tokens: int = 0  # of chunk_tokens, those whose chunk cache this ask encoded (not reused)
    recomputed_tokens: int = 0  # chunk tokens computed again against the assembled cache
    chunks_loaded: int = 0
    chunks_encoded: int = 0
    chunk_keys: list[str] = field(default_factory=list)

    @property
    def assembled(self) -> bool:
        """Whether the cache holds approximate factors (then it is saved under the assembled extras only)."""
        return self.chunk_tokens > 0

    def metrics(self, prompt_tokens: int) -> dict[str, int]:
        prefilled = prompt_tokens - self.reused_tokens - self.chunk_tokens - self.recomputed_tokens
        return {"reused_tokens": self.reused_tokens, "chunk_tokens": self.chunk_tokens,
                "recomputed_tokens": self.recomputed_tokens, "prefilled_tokens": prefilled,
                "chunk_caches_loaded": self.chunks_loaded, "chunk_caches_encoded": self.chunks_encoded,
                "chunk_tokens_encoded": self.encoded_tokens}


def restore_exact(store: Any, namespace: str, prompt_ids: list[int], cache: Any) -> Restored:
    """Exact prefix pages only (pinned mode, chunk reuse off)."""
    return Restored(reused_tokens=store.restore(namespace, prompt_ids, cache))


def restore_assembled(model: Any, store: Any, namespace: str, prompt_ids: list[int], cache: Any,
                      spans: Sequence[ChunkSpan], setting: ReuseSetting, owner: str) -> Restored:
    """Fill `cache` (sequence 0) with as much of `prompt_ids` as exact pages, an earlier assembled prefix and
    the chunk caches of `spans` give; the caller prefills the rest. Chunk caches this ask uses are pinned to
    `owner` before any is written, so the writes' eviction cannot drop them.

    The shared system prompt is prefilled when the store lacks it (`Restored.exact_tokens`: worth saving as
    exact pages). Every chunk is then placed, and the tokens between them (headers, each chunk's first
    `boundary_tokens`) are computed in one pass against the assembled cache (`tpa_core.assembly.recompute`): one
    forward for all of them, not one per chunk."""
    from tpa_core.assembly import place, recompute, select_deviating
    from tpa_core.store.chunks import ChunkCaches, chunk_key

    done = Restored(reused_tokens=store.restore(namespace, prompt_ids, cache))
    done.exact_tokens = done.reused_tokens
    limit = len(prompt_ids) - 1
    extras = setting.extras()
    chain = store.lookup(namespace, prompt_ids, limit=limit, extras=extras)
    if chain and min(chain[-1].start + chain[-1].n_tokens, limit) > done.reused_tokens:
        exact = done.reused_tokens
        got = store.restore(namespace, prompt_ids, cache, extras=extras)
        if got > exact:
            done.chunk_tokens = got - exact
        else:  # the assembled prefix failed verification part way: back to the exact one
            store.restore(namespace, prompt_ids, cache)
    todo = [s for s in spans if s.start >= cache.length(0) and s.end <= limit]
    if not todo:
        return done
    caches = ChunkCaches(store)
    keys = [chunk_key(namespace, prompt_ids[:s.prefix], prompt_ids[s.start:s.end], s.prefix) for s in todo]
    store.pin(keys, owner)
    done.chunk_keys = keys
    first = todo[0]
    if cache.length(0) < first.prefix:  # a plain prefill, as `encode_units` does: the same bits as its pages
        _prefill(model, cache, prompt_ids[cache.length(0):first.prefix])
        done.exact_tokens = first.prefix
    encoder = _Encoder(model, prompt_ids[:first.prefix])
    between: list[int] = []  # positions computed against the assembled cache: headers, boundary tokens
    placed: list[int] = []
    fresh: list[range] = []  # placed positions whose chunk cache this ask encoded
    wrote = False
    for span, key in zip(todo, keys):
        k = min(setting.boundary_tokens, span.end - span.start)
        at = span.start + k
        done.recomputed_tokens += k
        gap = at - cache.length(0)
        if gap > 0:  # counted now, written by the pass below before anything reads them
            between += range(cache.length(0), at)
            cache.reserve(at)
            cache.advance(gap, rows=slice(0, 1))
        if k == span.end - span.start:
            continue
        tensors = caches.load(namespace, key)
        if tensors is None or _length(tensors) != span.end - span.start:
            tensors = encoder.encode(prompt_ids[span.start:span.end])
            wrote = caches.save(namespace, key, span.prefix, tensors) == "written" or wrote
            done.chunks_encoded += 1
            fresh.append(range(at, span.end))
        else:
            done.chunks_loaded += 1
        rest = {name: t[k:] for name, t in tensors.items()}  # [T - k, ...]
        cache.import_(place(model, rest, at - (span.prefix + k)), 0, at)
        placed += range(at, span.end)
        done.chunk_tokens += span.end - at
    done.encoded_tokens = sum(map(len, fresh))
    if wrote:
        store.evict()
    recompute(model, cache, [prompt_ids[p] for p in between], between)
    if setting.recompute_ratio > 0 and placed:
        ids = [prompt_ids[p] for p in placed]
        chosen, states = select_deviating(model, cache, ids, placed, setting.recompute_ratio)
        recompute(model, cache, [prompt_ids[p] for p in chosen], chosen, first_layer_states=states)
        done.recomputed_tokens += len(chosen)
        done.chunk_tokens -= len(chosen)
        done.encoded_tokens -= sum(any(p in r for r in fresh) for p in chosen)
    return done


def save_exact_lead(store: Any, namespace: str, token_ids: list[int], cache: Any, restored: Restored,
                    boundaries: Sequence[int]) -> None:
    """Save the exact lead of an assembled cache (the shared system prompt `restore_assembled` prefilled) as
    exact pages, anchored at `boundaries`, so the next new question restores it instead of prefilling it."""
    if restored.assembled and restored.exact_tokens > restored.reused_tokens:
        lead = token_ids[:restored.exact_tokens]
        store.save(namespace, lead, cache, boundaries=[b for b in boundaries if b < len(lead)])


class _Encoder:
    """Encodes chunks on their own after the shared prefix, in one scratch cache (the prefix is run once)."""

    def __init__(self, model: Any, prefix_ids: list[int]) -> None:
        self.model, self.prefix_ids = model, prefix_ids
        self.scratch: Any = None

    def encode(self, chunk_ids: list[int]) -> dict:
        """The chunk's factors `layers.{i}.{name} -> [T, ...]`, its first token at `len(prefix_ids)`."""
        n = len(self.prefix_ids)
        if self.scratch is None:
            self.scratch = self.model.new_cache(capacity=n + len(chunk_ids))
            _prefill(self.model, self.scratch, self.prefix_ids)
        self.scratch.truncate(0, n)
        _prefill(self.model, self.scratch, chunk_ids)
        return self.scratch.export(0, n, n + len(chunk_ids))


def _prefill(model: Any, cache: Any, ids: list[int]) -> None:
    if ids:
        from tpa_core.generate import prefill

        prefill(model, cache, ids)


def _length(tensors: dict) -> int:
    return next(iter(tensors.values())).shape[0]


@dataclass
class EncodePlan:
    """What `encode_units` will do, known before it starts: chunks, those already cached, the bytes the rest
    take against the cache budget."""

    chunks: int
    cached: int
    to_encode: int
    bytes_needed: int
    budget_bytes: int

    def to_json(self) -> dict[str, int]:
        return {"chunks": self.chunks, "cached": self.cached, "to_encode": self.to_encode,
                "bytes_needed": self.bytes_needed, "budget_bytes": self.budget_bytes}


def encode_units(model: Any, tokenizer: Any, store: Any, namespace: str, units: Sequence[Any], *,
                 on_plan: Any = None, progress: Any = None, cancelled: Any = None) -> dict[str, int]:
    """Encode and store the chunk caches of `units` (`app.context.ContextUnit`s of a collection) that the store
    lacks, keyed exactly as an ask would look them up. Resumable: what is stored is skipped.

    `on_plan(EncodePlan)` is called once before any work; `progress(done, total, path)` after each chunk;
    `cancelled()` -> True stops between chunks. Returns the plan's numbers plus "encoded" and "rejected"."""
    from app.asking import chunk_spans
    from app.context import build_messages
    from tpa_core.store.chunks import ChunkCaches, chunk_key

    caches = ChunkCaches(store)
    work: list[tuple[Any, str, list[int], int]] = []  # (unit, key, chunk ids, reference)
    prefix_ids: list[int] = []
    for unit in units:
        messages = build_messages([unit], [], "?")
        ids = tokenizer.encode_chat(messages)
        spans = chunk_spans(tokenizer, messages, [unit], ids)
        if not spans:
            log.info("chunk %s #%d does not tokenize on its own; an ask prefills it", unit.path, unit.chunk_index)
            continue
        span = spans[0]
        prefix_ids = ids[:span.prefix]
        chunk_ids = ids[span.start:span.end]
        work.append((unit, chunk_key(namespace, prefix_ids, chunk_ids, span.prefix), chunk_ids, span.prefix))
    cached = caches.present(key for _, key, _, _ in work)
    todo = [w for w in work if w[1] not in cached]
    per_token = model.new_cache(capacity=1).nbytes_per_token()
    plan = EncodePlan(len(units), len(work) - len(todo), len(todo), per_token * sum(len(w[2]) for w in todo),
                      int(store.budget.budget_bytes))
    if on_plan is not None:
        on_plan(plan)
    encoded = rejected = 0
    encoder = _Encoder(model, prefix_ids)
    for done, (unit, key, chunk_ids, reference) in enumerate(todo, start=1):
        if cancelled is not None and cancelled():
            break
        outcome = caches.save(namespace, key, reference, encoder.encode(chunk_ids))
        encoded += outcome == "written"
        rejected += outcome == "rejected"
        if progress is not None:
            progress(done, len(todo), unit.path)
    if encoder.scratch is not None:  # the shared system prompt, prefilled exactly: every ask starts with it
        store.save(namespace, prefix_ids, encoder.scratch, boundaries=[len(prefix_ids)])
    if encoded:
        store.evict()
    return {**plan.to_json(), "encoded": encoded, "rejected": rejected}
