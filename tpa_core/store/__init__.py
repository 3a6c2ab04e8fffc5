"""The persisted factor-cache store: encode a context once, reuse it across questions, sessions and restarts.

What it guarantees: docs/store.md. Prefix pages of PAGE_TOKENS (256) tokens, keyed by a chained sha256 under a
namespace (model fingerprint, config, factor dtype, RoPE settings, blob format), stored one safetensors blob per
page (the tensors of `FactorCache.export`), indexed in SQL tables on the app's engine (SQLite or PostgreSQL),
written atomically, verified as they are read, evicted LRU under a byte budget.

Use (the app's one entry point)::

    from tpa_core.store import FactorStore

    store = FactorStore.open(engine, settings.blobs_dir, settings.cache_budget_bytes)  # tables + reconciliation
    ns = store.namespace_for(loaded_model, dtype=cache.dtype)    # or namespace_for(fingerprint, config, dtype)
    reused = store.restore(ns, token_ids, cache, seq=0)          # cache now holds tokens [0, reused)
    ... prefill token_ids[reused:] into the cache ...
    store.save(ns, token_ids, cache, seq=0, boundaries=[context_end])  # new pages, the tail, an anchored
                                                                 # tail at the context's end -> disk
    store.pin(store.prefix_keys(ns, token_ids), owner="session:42")   # never evicted until unpin("session:42")
    store.stats(); store.verify(); store.gc(); store.clear()

- `restore` leaves at least the last token to prefill (its logits are needed); `limit=` caps it further.
- Each byte moves once: `save` writes the cache's own memory, `restore` reads each blob straight into the cache
  (past the sequence's valid length, which moves over a page only once it is verified), several pages at once.
- A bad page (size, not a regular file, checksum, header, names, shapes, dtypes) is quarantined with a warning
  and counted as a miss: the restore stops before it and the caller recomputes the rest. A page evicted by
  another process since the lookup is a plain miss.
- `tpa_core.store.blobs.read_page_into` is the one read-and-verify path of a page; another entry kind stored
  beside the prefix pages reads its blobs through it.
- Bit-identical logits: the factors round-trip bit-exactly, so a reused prefix gives the same logits as a fresh
  prefill that cuts its chunks where the cached one was cut (at page boundaries, and at `boundaries`) and runs
  with the same torch thread count: on the CPU, torch may pick another reduction order for a small chunk at
  another thread count (measured: the last row of a 5-token chunk, 2 prompts of 40, 1 vs 2 threads).
- `boundaries`: a prompt's last partial page is kept as a "tail" that a longer tail or the full page replaces
  later; a tail at a boundary (the end of the document context) is anchored instead - never replaced, only
  evicted - so the next question on the same context reuses it too.
- Several processes may read and write at once: a page is claimed by an atomic insert, written by one process
  only, and its file never changes afterwards.
"""

from tpa_core.store.errors import StoreError
from tpa_core.store.keys import FORMAT_VERSION, PAGE_TOKENS
from tpa_core.store.store import FactorStore, PageRef, StoreStats, VerifyReport

__all__ = ["FORMAT_VERSION", "PAGE_TOKENS", "FactorStore", "PageRef", "StoreError", "StoreStats", "VerifyReport"]
