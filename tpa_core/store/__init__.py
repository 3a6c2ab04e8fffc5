"""The persisted factor-cache store: encode a context once, reuse it across questions, sessions and restarts.

Design: /work/shared/design/cache-store.md. Prefix pages of PAGE_TOKENS (256) tokens, keyed by a chained sha256
under a namespace (model fingerprint, config, factor dtype, RoPE settings, blob format), stored one safetensors
blob per page (the tensors of `FactorCache.export`), indexed in SQL tables on the app's engine (SQLite or
PostgreSQL), written atomically, verified before use, evicted LRU under a byte budget.

Use (the app's one entry point)::

    from tpa_core.store import FactorStore

    store = FactorStore.open(engine, settings.blobs_dir, settings.cache_budget_bytes)  # tables + reconciliation
    ns = store.namespace_for(loaded_model, dtype=cache.dtype)    # or namespace_for(fingerprint, config, dtype)
    reused = store.restore(ns, token_ids, cache, seq=0)          # cache now holds tokens [0, reused)
    ... prefill token_ids[reused:] into the cache ...
    store.save(ns, token_ids, cache, seq=0)                      # new full pages (and the tail) -> disk
    store.pin(store.prefix_keys(ns, token_ids), owner="session:42")   # never evicted until unpin("session:42")
    store.stats(); store.verify(); store.gc(); store.clear()

- `restore` leaves at least the last token to prefill (its logits are needed); `limit=` caps it further.
- A bad page (checksum, header, names, shapes, dtypes) is quarantined with a warning and counted as a miss:
  the restore stops before it and the caller recomputes the rest.
- Bit-identical logits: a reused prefix gives the same logits as a fresh prefill when the fresh prefill cuts its
  chunks at the same positions (the restored length and the page boundaries before it). The factors themselves
  round-trip bit-exactly.
- Several processes may read and write at once: a page is claimed by an atomic insert, written by one process
  only, and its file never changes afterwards.
"""

from tpa_core.store.errors import StoreError
from tpa_core.store.keys import FORMAT_VERSION, PAGE_TOKENS
from tpa_core.store.store import FactorStore, PageRef, StoreStats, VerifyReport

__all__ = ["FORMAT_VERSION", "PAGE_TOKENS", "FactorStore", "PageRef", "StoreError", "StoreStats", "VerifyReport"]
