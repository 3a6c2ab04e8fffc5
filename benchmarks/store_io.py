"""Save and restore throughput of the factor store on a synthetic cache, beside the read+hash floor of its files.

    .venv/bin/python benchmarks/store_io.py [--tokens 4096] [--threads 2] [--repeats 5] [--json OUT.json]

No model is needed: a `FactorCache` shaped like the default model's (30 layers, fixed head factors, `bk` and `bv`
of 3 x 64 float32 per token: 46,080 bytes per token) is filled with random values, saved to an empty store in a
temporary folder, and restored into a fresh cache `--repeats` times (median). The floor is `cat` and `sha256sum`
over the same blob files, from the same page cache. The store is imported from `sys.path`, so the same script
times another checkout's store with `PYTHONPATH=OTHER_CHECKOUT`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch
    from sqlalchemy import create_engine

    from tpa_core.cache import FactorCache
    from tpa_core.config import TPAConfig
    from tpa_core.store import FactorStore

    torch.set_num_threads(args.threads)
    n = args.tokens
    config = TPAConfig(vocab_size=128, d_model=64, n_layers=30, n_heads=9, head_dim=64, k_rank=3, v_rank=3,
                       mlp_hidden=64, q_rank=0, contextual_kv=False, max_position_embeddings=max(8192, 2 * n))
    cache = FactorCache(config, capacity=n)
    g = torch.Generator().manual_seed(0)
    for i in range(config.n_layers):
        cache.write(i, {name: torch.randn(1, n, *shape, generator=g) for name, shape in cache.shapes.items()},
                    starts=[0])  # [1, n, ...]
    cache.advance(n)
    ids = list(range(n))
    with tempfile.TemporaryDirectory(prefix="store-io-") as folder:
        store = FactorStore.open(create_engine(f"sqlite:///{folder}/store.sqlite"), Path(folder) / "blobs", 2**40)
        ns = store.namespace_for("store-io-benchmark", config, torch.float32)
        t0 = time.perf_counter()
        store.save(ns, ids, cache)
        save_s = time.perf_counter() - t0
        chain = store.lookup(ns, ids, limit=n)
        files = [str(store.blobs_dir / ref.path) for ref in chain]
        nbytes = sum(ref.nbytes for ref in chain)
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        cat_s = _median_s(lambda: subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True),
                          args.repeats)
        sha_s = _median_s(lambda: subprocess.run(["sha256sum", *files], stdout=subprocess.DEVNULL, check=True),
                          args.repeats)
        warm = FactorCache(config, capacity=n)
        restore_s = _median_s(lambda: store.restore(ns, ids, warm, limit=n), args.repeats)
        exact = all(torch.equal(a, b) for a, b in zip(cache.export(0, 0, n).values(), warm.export(0, 0, n).values()))
    out = {"tokens": n, "threads": args.threads, "bytes": nbytes, "files": len(files), "save_s": save_s,
           "restore_s": restore_s, "cat_s": cat_s, "sha256sum_s": sha_s, "exact": exact and warm.length(0) == n,
           "restore_mb_s": nbytes / restore_s / 1e6, "save_mb_s": nbytes / save_s / 1e6,
           "cat_mb_s": nbytes / cat_s / 1e6, "sha256sum_mb_s": nbytes / sha_s / 1e6,
           "restore_ms_per_1k_tokens": 1e6 * restore_s / n, "loadavg": os.getloadavg()}
    print(f"{n} tokens, {len(files)} files, {nbytes / 1e6:.0f} MB: restore {restore_s * 1e3:.0f} ms "
          f"({out['restore_mb_s']:.0f} MB/s, exact: {out['exact']}), save {save_s * 1e3:.0f} ms "
          f"({out['save_mb_s']:.0f} MB/s); floor: cat {cat_s * 1e3:.0f} ms ({out['cat_mb_s']:.0f} MB/s), "
          f"sha256sum {sha_s * 1e3:.0f} ms ({out['sha256sum_mb_s']:.0f} MB/s); load average {out['loadavg'][0]:.1f}")
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
