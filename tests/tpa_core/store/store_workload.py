"""Shared workload of the store tests: a tiny random TPA model, prompts, page-aligned prefill, a store opener.

Also a script, run in a fresh interpreter by the restart test:
    python tests/tpa_core/store/store_workload.py restore DB_URL BLOBS_DIR SEED...   -> one JSON line on stdout
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import torch

PAGE = 256
VOCAB = 101


def make_config():
    from tpa_core.config import TPAConfig

    return TPAConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, head_dim=8, k_rank=2, v_rank=2,
                     mlp_hidden=64, q_rank=2, max_position_embeddings=4096)


def make_model(config=None, seed: int = 1234):
    """The tiny model; the same seed gives the same weights in every process."""
    from tpa_core.model import TPAModel

    torch.manual_seed(seed)
    model = TPAModel(config or make_config()).eval()
    model.attention_backend = "torch"
    return model


def prompt(seed: int, n_tokens: int, shared: int = 0, shared_seed: int = 7) -> list[int]:
    """`n_tokens` token ids; the first `shared` come from `shared_seed` (a common document prefix)."""
    head = random.Random(shared_seed).choices(range(VOCAB), k=shared)
    return head + random.Random(seed).choices(range(VOCAB), k=n_tokens - shared)


@torch.no_grad()
def prefill_paged(model, ids: list[int], cache=None, seq: int = 0, cuts: tuple[int, ...] = ()):
    """Prefill `ids[cache.length(seq):]` in chunks cut at absolute multiples of PAGE (the store's pages) and at
    `cuts`, so a restored prefix and a fresh prefill run exactly the same chunks. Returns (cache, logits [V])."""
    cache = cache if cache is not None else model.new_cache()
    pos = cache.length(seq)
    logits = None
    while pos < len(ids):
        end = min([len(ids), (pos // PAGE + 1) * PAGE, *(c for c in cuts if c > pos)])
        chunk = torch.tensor([ids[pos:end]])  # [1, N]
        logits = model(chunk, cache, seq=seq if cache.batch_size > 1 else None, last_only=True)[0, -1]
        pos = end
    return cache, logits


def factor_digest(cache, n: int, seq: int = 0) -> str:
    """sha256 over the factors of tokens [0, n) of a cache (names sorted)."""
    h = hashlib.sha256()
    for name, t in sorted(cache.export(seq, 0, n).items()):
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def open_store(url: str, blobs: str | Path, budget: int = 10**9, **kw):
    from app.database import make_engine
    from tpa_core.store import FactorStore

    return FactorStore.open(make_engine(url), blobs, budget, **kw)


def namespace(store, config=None, fingerprint: str = "tiny-random-1234"):
    return store.namespace_for(fingerprint, config or make_config(), torch.float32)


def restore_digests(store, ns: str, model, seeds: list[int]) -> list[dict]:
    """Restore each seed's prompt into a fresh cache: how many tokens were reused and the restored factors' digest."""
    out = []
    for s in seeds:
        ids = prompt(s, 700, shared=300)
        cache = model.new_cache()
        reused = store.restore(ns, ids, cache)
        out.append({"seed": s, "reused": reused, "digest": factor_digest(cache, reused)})
    return out


def _restore_main(url: str, blobs: str, seeds: list[int]) -> None:
    """Restore each seed's prompt in this (new) process; print what was found and the factor digests."""
    store = open_store(url, blobs)
    out = restore_digests(store, namespace(store), make_model(), seeds)
    print(json.dumps({"prompts": out, "hits": store.session.hits, "misses": store.session.misses,
                      "hit_rate": store.session.hit_rate}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    if sys.argv[1] == "restore":
        _restore_main(sys.argv[2], sys.argv[3], [int(s) for s in sys.argv[4:]])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
