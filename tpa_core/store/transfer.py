"""Moving pages between a live `FactorCache` and their blobs: each byte once, several pages at a time.

A page of sequence `seq` covering tokens `[start, end)` is, per layer i and factor name, the slice
`cache.storage[name][i, seq, start:end]` - contiguous `[end - start, ...]` memory. Saving writes those slices as
they are; restoring reads each blob straight into them. The slices past the sequence's valid length are not part
of the live cache (nothing reads them), so they serve as the staging area: the length moves past a page only
once its every byte is verified, and a page that fails is zeroed again. A cache on another device reads into a
host staging page first and is copied once verified.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tpa_core.store import blobs as blobfmt
from tpa_core.store.errors import PageCorrupt, StoreError
from tpa_core.store.records import PageRef

if TYPE_CHECKING:
    from torch import Tensor

    from tpa_core.cache import FactorCache

log = logging.getLogger(__name__)


def live_views(cache: FactorCache, seq: int, start: int, end: int) -> dict[str, Tensor]:
    """Tokens `[start, end)` of sequence `seq` as `{"layers.{i}.{name}": [end - start, ...]}`: views of the
    cache's own storage, on its own device (contiguous: a slice of the token axis of `[T_cap, ...]`)."""
    return {f"layers.{i}.{name}": storage[i, seq, start:end]
            for i in range(cache.config.n_layers) for name, storage in cache.storage.items()}


def page_tensors(cache: FactorCache, seq: int, start: int, end: int) -> dict[str, Tensor]:
    """The tensors a save writes: `live_views` on the CPU (nothing copied), host copies
    (`FactorCache.export`) for a cache on another device."""
    if cache.device.type != "cpu":
        return cache.export(seq, start, end)
    return live_views(cache, seq, start, end)


def check_fits(cache: FactorCache, layout: Mapping[str, list], namespace: str) -> None:
    """A cache restores from a namespace only if its factors have the namespace's names, dtypes and shapes."""
    mine = blobfmt.layout_of(live_views(cache, 0, 0, 1))
    if mine != dict(layout):
        raise StoreError(f"this cache's factors do not fit namespace {namespace[:16]}... (a different model or "
                         f"dtype?): {sorted(mine.items())[:2]} vs {sorted(layout.items())[:2]}")


def _storage_slices(cache: FactorCache, seq: int, start: int, end: int) -> dict[str, memoryview]:
    """The bytes of `live_views(cache, seq, start, end)` as writable memoryviews: slices of one byte view per
    storage tensor (a CPU cache's storage is contiguous `[L, B, T_cap, ...]`), cheaper than a view per tensor."""
    out: dict[str, memoryview] = {}
    for name, storage in cache.storage.items():
        whole = blobfmt.byte_view(storage)
        token_bytes = storage[0, 0, 0].numel() * storage.element_size()
        L, B, T = storage.shape[:3]
        for i in range(L):
            at = ((i * B + seq) * T + start) * token_bytes  # byte offset of [i, seq, start]
            out[f"layers.{i}.{name}"] = whole[at:at + (end - start) * token_bytes]
    return out


@dataclass
class Loaded:
    """What `load_chain` made live: `tokens` valid tokens, the pages `used`, and the page that failed
    verification with the reason (`bad`), if one did. A page that vanished is a plain miss: neither."""

    tokens: int = 0
    used: list[str] = field(default_factory=list)
    bad: tuple[PageRef, str] | None = None


def _read_one(blobs_dir: Path, ref: PageRef, dest: Mapping[str, memoryview], layout: Mapping[str, list],
              ) -> tuple[str, str]:
    """("ok", "") when the page is verified in `dest`; ("missing", "") when its file is gone; ("bad", why)."""
    try:
        blobfmt.read_page_into(blobs_dir / ref.path, dest, nbytes=ref.nbytes, checksum=ref.checksum,
                               expect=ref.expect(), layout=layout)
    except FileNotFoundError:
        return "missing", ""
    except PageCorrupt as exc:
        return "bad", str(exc) or "corrupt"
    return "ok", ""


def reads_in_place(cache: FactorCache) -> bool:
    """Whether pages are read straight into the cache's storage (host memory) rather than through a staging
    page copied to the device once verified."""
    return cache.device.type == "cpu"


def load_chain(blobs_dir: Path, chain: Sequence[PageRef], layout: Mapping[str, list], cache: FactorCache,
               seq: int, limit: int, threads: int = 1) -> Loaded:
    """Read the pages of `chain` (consecutive, from position 0) into sequence `seq` of `cache`, whose length
    must be 0, and make the longest verified run of them live, up to `limit` tokens.

    Pages are read by up to `threads` threads at once (reading and hashing release the GIL). The sequence's
    length is set once, at the end, to the tokens of the verified run; the rest of what was read is zeroed."""
    import torch

    out = Loaded()
    if not chain:
        return out
    end = chain[-1].start + chain[-1].n_tokens
    in_place = reads_in_place(cache)
    with torch.inference_mode():
        cache.reserve(end)  # before taking views: growing replaces the storage tensors
        if in_place:
            pages: list[dict[str, Tensor]] = []
            dests = [_storage_slices(cache, seq, ref.start, ref.start + ref.n_tokens) for ref in chain]
        else:
            pages = [blobfmt.empty_page(layout, ref.n_tokens) for ref in chain]
            dests = [{name: blobfmt.byte_view(t) for name, t in page.items()} for page in pages]
        jobs = list(zip(chain, dests))
        if threads > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(max_workers=min(threads, len(jobs)), thread_name_prefix="store-read") as pool:
                results = list(pool.map(lambda job: _read_one(blobs_dir, job[0], job[1], layout), jobs))
        else:
            results = []
            for ref, dest in jobs:  # one at a time: stop at the first page that is not there or not right
                results.append(_read_one(blobs_dir, ref, dest, layout))
                if results[-1][0] != "ok":
                    break
        for k, (ref, (outcome, reason)) in enumerate(zip(chain, results)):
            if outcome == "missing":
                break
            if outcome == "bad":
                out.bad = (ref, reason)
                break
            if not in_place:
                for name, t in live_views(cache, seq, ref.start, ref.start + ref.n_tokens).items():
                    t.copy_(pages[k][name])
            out.tokens = ref.start + min(ref.n_tokens, limit - ref.start)
            out.used.append(ref.key)
        if out.tokens < end and len(out.used) < len(chain):  # what did not become live goes back to zeros
            for storage in cache.storage.values():
                storage[:, seq, out.tokens:end].zero_()  # [L, end - tokens, ...]
        cache.advance(out.tokens, rows=slice(seq, seq + 1))
    return out

