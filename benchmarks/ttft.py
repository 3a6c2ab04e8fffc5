"""Time to first token with the persisted factor cache: a cold prefill vs a restore from disk in a NEW process.

    .venv/bin/tpa-rag models fetch                       # once: the default model into the model cache
    .venv/bin/python benchmarks/ttft.py [--data-dir DIR] [--model NAME] [--lengths 1024 4096 8000]
                                        [--threads 1 2] [--repeats 3] [--json OUT.json]

For each context length L the prompt is L tokens of real text (Python standard-library sources, read in a fixed
order) followed by a question. Two processes run one after the other, each loading the model itself:

1. cold: an empty store. TTFT = store lookup (a miss) + prefill of the whole prompt + the first token (argmax),
   median of `--repeats` runs on a fresh cache. Then the pages are saved, with an anchored tail at the end of
   the context (what the app does), and the bytes on disk are measured.
2. warm, a new process: the store is opened from disk (reconciliation included, not timed). TTFT = restore +
   prefill of what is left + the first token, for (a) the same prompt again and (b) the same context with a new
   question. Median of `--repeats`, each on a fresh cache reading the blobs from disk (after the first run the
   OS page cache holds them: the figures are "warm disk", as for any second question).

3. the floor, in the warm process right before each length's warm runs: the blobs that restore reads, read with
   `cat` (to /dev/null) and read and hashed with `sha256sum`, timed as whole commands (median of `--repeats`),
   from the same page cache the restore reads from.

Each `--threads` value gets its own pair of processes and its own empty store. Reported: cold and warm TTFT,
warm/cold ratios, tokens reused, restore time per 1,000 tokens and MB/s, the floor in MB/s and restore time over
floor time, the time to save the pages, and bytes per token on disk against the factor bytes per token of the
cache (`FactorCache.nbytes_per_token`); with the CPU model, the torch build and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # this checkout's packages first, installed or not
STDLIB_FILES = ("argparse.py", "inspect.py", "typing.py", "dataclasses.py", "pathlib.py", "functools.py")
QUESTIONS = ("\n\nQuestion: Which classes are defined in the code above?\nAnswer:",
             "\n\nQuestion: What does the first function above return?\nAnswer:")


def _context_text() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "".join((lib / name).read_text(encoding="utf-8") for name in STDLIB_FILES)


_TOKENS: dict[int, list[int]] = {}


def _prompts(tokenizer, length: int, offset: int = 0) -> tuple[list[int], list[int], list[int]]:
    """(context ids: `length` tokens from `offset` on, question A ids, question B ids). Each length reads its
    own stretch of text, so no context is a prefix of another (a cold run must find nothing)."""
    if id(tokenizer) not in _TOKENS:
        _TOKENS[id(tokenizer)] = tokenizer.encode(_context_text(), add_special_tokens=False)
    context = _TOKENS[id(tokenizer)]
    if len(context) < offset + length:
        raise SystemExit(f"only {len(context)} tokens of text for a {length}-token context at {offset}")
    return (context[offset:offset + length], tokenizer.encode(QUESTIONS[0], add_special_tokens=False),
            tokenizer.encode(QUESTIONS[1], add_special_tokens=False))


def _offset(lengths: list[int], length: int) -> int:
    """Where the text of `length` starts: after the texts of the lengths before it (and the warm-up's 256)."""
    return 256 + sum(lengths[:lengths.index(length)])


def _ttft(model, store, ns, ids: list[int]) -> tuple[float, int, float, int]:
    """One time to first token on a fresh cache: (seconds, tokens reused, restore seconds, first token)."""
    import torch

    from tpa_core.generate import prefill

    cache = model.new_cache(capacity=len(ids) + 64)
    t0 = time.perf_counter()
    reused = store.restore(ns, ids, cache)
    t1 = time.perf_counter()
    logits = prefill(model, cache, ids[reused:])
    first = int(torch.argmax(logits))
    t2 = time.perf_counter()
    return t2 - t0, reused, t1 - t0, first


def _open(args) -> tuple:
    from app.database import make_engine
    from tpa_core.loading import load_model
    from tpa_core.store import FactorStore

    loaded = load_model(args.model, Path(args.data_dir) / "models", device="cpu")
    store = FactorStore.open(make_engine(f"sqlite:///{args.store_dir}/store.sqlite"),
                             Path(args.store_dir) / "blobs", 64 * 1024**3)
    return loaded, store, store.namespace_for(loaded)  # keyed by its cache dtype


def phase_cold(args) -> dict:
    import torch

    loaded, store, ns = _open(args)
    model = loaded.model
    out = {}
    _ttft(model, store, ns, _prompts(loaded.tokenizer, 256)[0])  # warm-up: first-call allocations
    for length in args.lengths:
        context, qa, _ = _prompts(loaded.tokenizer, length, _offset(args.lengths, length))
        ids = context + qa
        runs = [_ttft(model, store, ns, ids) for _ in range(args.cold_repeats or args.repeats)]
        assert all(r[1] == 0 for r in runs), "the cold runs found pages: the store was not empty"
        cache = model.new_cache(capacity=len(ids) + 64)
        from tpa_core.generate import prefill

        prefill(model, cache, ids)
        before = store.stats().bytes
        t0 = time.perf_counter()
        written = store.save(ns, ids, cache, boundaries=[len(context)])
        save_s = time.perf_counter() - t0
        disk = store.stats().bytes - before
        stored_tokens = len(ids) + (len(context) % 256)  # the anchored context tail is stored as well
        out[str(length)] = {
            "prompt_tokens": len(ids), "cold_s": statistics.median(r[0] for r in runs),
            "cold_runs_s": [r[0] for r in runs], "first_token": runs[0][3], "pages_written": written,
            "save_s": save_s, "disk_bytes": disk, "disk_bytes_per_token": disk / stored_tokens,
            "factor_bytes_per_token": cache.nbytes_per_token(),
        }
    out["threads"] = torch.get_num_threads()
    return out


def phase_warm(args) -> dict:
    import torch

    loaded, store, ns = _open(args)
    model = loaded.model
    out = {}
    _ttft(model, store, ns, list(range(300, 556)))  # warm-up on tokens no prompt starts with (a miss)
    for length in args.lengths:
        context, qa, qb = _prompts(loaded.tokenizer, length, _offset(args.lengths, length))
        row = {}
        for label, ids in (("same", context + qa), ("new_question", context + qb)):
            chain = store.lookup(ns, ids, limit=len(ids) - 1)
            files = [str(store.blobs_dir / ref.path) for ref in chain]
            row[label] = {"floor": _floor(files, args.repeats), "read_bytes": sum(ref.nbytes for ref in chain)}
            runs = [_ttft(model, store, ns, ids) for _ in range(args.repeats)]
            row[label].update({"warm_s": statistics.median(r[0] for r in runs), "warm_runs_s": [r[0] for r in runs],
                               "reused": runs[0][1], "prompt_tokens": len(ids), "first_token": runs[0][3],
                               "restore_s": statistics.median(r[2] for r in runs)})
        out[str(length)] = row
    out["threads"] = torch.get_num_threads()
    out["hit_rate"] = store.session.hit_rate
    return out


def _floor(files: list[str], repeats: int) -> dict:
    """Seconds to read the files with `cat` and to read and hash them with `sha256sum` (whole commands, median
    of `repeats`, after one untimed `cat` so that both find the page cache as restore does)."""
    if not files:
        return {"cat_s": None, "sha256sum_s": None}
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    out = {}
    for label, cmd in (("cat_s", ["cat", *files]), ("sha256sum_s", ["sha256sum", *files])):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
            times.append(time.perf_counter() - t0)
        out[label] = statistics.median(times)
    return out


def _conditions() -> dict:
    """CPU model, torch build and math library, load average: what the figures depend on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    config = torch.__config__.show()
    blas = next((part.split("=", 1)[1] for part in config.replace(",", " ").split() if part.startswith("BLAS_INFO=")),
                "?")
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "blas": blas,
            "python": platform.python_version(), "loadavg": os.getloadavg()}


def _child(args, phase: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--data-dir", str(args.data_dir), "--model", args.model,
           "--store-dir", str(args.store_dir), "--repeats", str(args.repeats), "--threads", str(threads),
           "--cold-repeats", str(args.cold_repeats),
           "--lengths", *map(str, args.lengths)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")])})
    if done.returncode != 0:
        raise SystemExit(f"{phase} phase failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mb_s(nbytes: int, seconds: float | None) -> float | None:
    return nbytes / seconds / 1e6 if seconds else None


def _row(length: int, c: dict, w: dict) -> dict:
    same, new = w["same"], w["new_question"]
    floor = same["floor"]
    return {**c, "warm_same": same, "warm_new_question": new,
            "ratio_same": same["warm_s"] / c["cold_s"], "ratio_new_question": new["warm_s"] / c["cold_s"],
            "restore_ms_per_1k_tokens": 1e6 * same["restore_s"] / max(1, same["reused"]),
            "restore_mb_s": _mb_s(same["read_bytes"], same["restore_s"]),
            "cat_mb_s": _mb_s(same["read_bytes"], floor["cat_s"]),
            "sha256sum_mb_s": _mb_s(same["read_bytes"], floor["sha256sum_s"]),
            "restore_over_floor": same["restore_s"] / floor["sha256sum_s"] if floor["sha256sum_s"] else None,
            "same_first_token": same["first_token"] == c["first_token"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="tpa-rag data dir holding models/ (default: settings)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold-repeats", type=int, default=0, help="cold runs per length (default: --repeats)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads; each value runs its own cold and warm processes")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--phase", choices=("cold", "warm"), help=argparse.SUPPRESS)
    parser.add_argument("--store-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.data_dir is None:
        from app.settings import Settings

        args.data_dir = Settings.from_env().data_dir
    if args.phase:
        import torch

        torch.set_num_threads(args.threads[0])
        result = (phase_cold if args.phase == "cold" else phase_warm)(args)
        print(json.dumps(result))
        return
    if not shutil.which("sha256sum"):
        raise SystemExit("the floor needs `cat` and `sha256sum` on PATH")

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
              "repeats": args.repeats, "cold_repeats": args.cold_repeats or args.repeats,
              "conditions_before": _conditions(), "runs": {}}
    print(f"{'thr':>3} {'context':>7} {'cold s':>7} | {'warm s':>7} {'ratio':>6} {'reused':>6} | "
          f"{'new q s':>7} {'ratio':>6} | {'restore ms/1k':>13} {'MB/s':>6} | {'cat MB/s':>8} "
          f"{'sha256sum MB/s':>14} {'restore/floor':>13} | {'save s':>6} {'disk B/tok':>10}")
    for threads in args.threads:
        with tempfile.TemporaryDirectory(prefix="ttft-store-") as store_dir:
            args.store_dir = store_dir
            cold = _child(args, "cold", threads)
            warm = _child(args, "warm", threads)
        rows = report["runs"][str(threads)] = {}
        for length in args.lengths:
            row = rows[str(length)] = _row(length, cold[str(length)], warm[str(length)])
            print(f"{threads:>3} {length:>7} {row['cold_s']:>7.3f} | {row['warm_same']['warm_s']:>7.3f} "
                  f"{row['ratio_same']:>6.3f} {row['warm_same']['reused']:>6} | "
                  f"{row['warm_new_question']['warm_s']:>7.3f} {row['ratio_new_question']:>6.3f} | "
                  f"{row['restore_ms_per_1k_tokens']:>13.1f} {row['restore_mb_s']:>6.0f} | "
                  f"{row['cat_mb_s']:>8.0f} {row['sha256sum_mb_s']:>14.0f} {row['restore_over_floor']:>13.2f} | "
                  f"{row['save_s']:>6.2f} {row['disk_bytes_per_token']:>10.1f}")
        rows["hit_rate"] = warm["hit_rate"]
        rows["first_token_equal"] = all(rows[str(n)]["same_first_token"] for n in args.lengths)
    report["conditions_after"] = _conditions()
    c0, c1 = report["conditions_before"], report["conditions_after"]
    print(f"first token equal cold/warm: {all(r['first_token_equal'] for r in report['runs'].values())}; "
          f"{c0['cpu']} x{c0['cpus']}, torch {c0['torch']} ({c0['blas']}), Python {c0['python']}; load average "
          f"{c0['loadavg'][0]:.1f} before, {c1['loadavg'][0]:.1f} after")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
