"""Time to first token of chunk reuse against a full prefill, timing only: on a CPU or a GPU, real or random weights.

    python benchmarks/chunk_reuse_timing.py --model-dir DIR [--random-weights] [--device cuda] [--dtype bfloat16]
                                            [--questions 20] [--settings k0,k16] [--repeats 3] [--json OUT]

`benchmarks/chunk_reuse.py` measures what chunk reuse costs in answers and needs the retrieval stack and the real
model; this script measures only its speed, so it runs where neither is at hand (a GPU machine without the model
files): `--model-dir` is a converted model folder (`config.json`, `tokenizer.json`, `tokenizer_meta.json`); with
`--random-weights` its weights file is not read and the model gets random weights of the same shapes, which take
the same time to run.

The prompts are laid out by the app (`app.asking.plan_prompt`) as an ask would: for each question of
benchmarks/questions/cpython_extractive.json, the chunk of its file that holds the answer's evidence and `--top-k`
- 1 other chunks of the CPython modules of retrieval_questions.json (chunked by `retrieval.chunking`, picked with a
seed per question), in canonical order. The chunk caches are encoded and stored first (untimed: "the chunks are
already encoded"); then, side by side per question, a full prefill and each setting (`app.chunk_reuse`:
chunk caches placed, the first k tokens of each chunk recomputed, the rest prefilled), each the median of
`--repeats`, synchronized on a GPU. Reported: the median over questions of setting / full.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _pick_units(question: dict, pool: list, top_k: int, seed: int) -> list:
    """The chunk of the question's file holding its evidence, plus `top_k - 1` others drawn with `seed`."""
    own = [u for u in pool if u.path == question["file"] and question["evidence"] in u.text]
    first = own[0] if own else next(u for u in pool if u.path == question["file"])
    others = [u for u in pool if u is not first]
    return [first, *random.Random(seed).sample(others, top_k - 1)]


def _timed(fn, device) -> float:
    """Seconds `fn()` takes, the device's queue drained before and after."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="a converted model folder (config.json + tokenizer)")
    parser.add_argument("--random-weights", action="store_true", help="random weights of the folder's shapes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--stdlib", default=None, help="CPython's Lib/ (default: this interpreter's)")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--settings", default="k0,k16", help="kN: the first N tokens of each chunk recomputed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows and the summary here")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # this checkout first; benchmarks/ would shadow retrieval
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

    import torch

    from app.asking import plan_prompt
    from app.chunk_reuse import ReuseSetting, restore_assembled
    from app.context import ContextUnit, canonical
    from app.database import make_engine
    from retrieval.chunking import chunk_text, kind_for_path
    from tpa_core.config import TPAConfig
    from tpa_core.generate import prefill
    from tpa_core.loading import LoadedModel, assign_parameters, read_cache_meta
    from tpa_core.model import TPAModel
    from tpa_core.store import FactorStore
    from tpa_core.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    folder = Path(args.model_dir)
    meta = read_cache_meta(folder)
    config = TPAConfig.from_dict(meta["tpa_config"])
    if args.random_weights:
        torch.manual_seed(0)
        model = TPAModel(config, device=device, dtype=dtype).eval()
        fingerprint = "random-" + meta["fingerprint"][:56]
    else:
        from safetensors.torch import load_file

        model = assign_parameters(config, load_file(str(folder / "model.safetensors")), device, dtype)
        fingerprint = meta["fingerprint"]
    tokenizer = Tokenizer.load(folder)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, config=config, fingerprint=fingerprint,
                         chat_template=tokenizer.chat_template, name=meta.get("name", folder.name), source=folder,
                         cache_dir=folder)

    stdlib = Path(args.stdlib or sysconfig.get_paths()["stdlib"])
    modules = json.loads((HERE / "retrieval_questions.json").read_text())["modules"]
    pool = []
    for module in (m for m in modules if (stdlib / m).is_file()):  # another Python may lack a few
        text = (stdlib / module).read_text(encoding="utf-8")
        for index, chunk in enumerate(chunk_text(text, kind_for_path(module))):
            pool.append(ContextUnit("stdlib", module, index, chunk.text, chunk.start_line, chunk.end_line))
    questions = json.loads((HERE / "questions" / "cpython_extractive.json").read_text())["questions"]
    questions = [q for q in questions if (stdlib / q["file"]).is_file()][:args.questions]
    chosen = [s for s in args.settings.split(",") if s]

    work = Path(tempfile.mkdtemp(prefix="chunk-timing-"))
    store = FactorStore.open(make_engine(f"sqlite:///{work / 'index.sqlite'}"), work / "blobs", 64 * 1024**3)
    namespace = store.namespace_for(loaded, dtype=dtype)
    rows = []
    for n, question in enumerate(questions):
        units = canonical(_pick_units(question, pool, args.top_k, seed=n))
        plan = plan_prompt(tokenizer, units, [], question["q"], hits={u.sort_key for u in units},
                           budget=loaded.context_window - 64, pinned=False)
        ids = plan.prompt_ids
        if not plan.spans:
            continue
        cache = model.new_cache(capacity=len(ids) + 1)
        restore_assembled(model, store, namespace, ids, cache, plan.spans, ReuseSetting(0, 0.0), "bench")

        def full() -> None:
            cache.reset()
            prefill(model, cache, ids)

        def assembled(setting: ReuseSetting) -> None:
            cache.reset()
            restore_assembled(model, store, namespace, ids, cache, plan.spans, setting, "bench")
            prefill(model, cache, ids[cache.length(0):])

        with torch.inference_mode():
            full()  # warm-up: kernels compiled, allocator grown
            row = {"prompt_tokens": len(ids), "full_s": statistics.median(
                _timed(full, device) for _ in range(args.repeats))}
            for name in chosen:
                setting = ReuseSetting(int(name.removeprefix("k")), 0.0)
                row[name] = statistics.median(_timed(lambda s=setting: assembled(s), device)
                                              for _ in range(args.repeats))
        rows.append(row)
        print(f"[{n + 1}/{len(questions)}] {len(ids)} tokens: full {row['full_s'] * 1e3:.1f} ms " +
              " ".join(f"{s} {row[s] / row['full_s']:.2f}x" for s in chosen), file=sys.stderr)
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": args.dtype, "threads": args.threads,
        "weights": "random" if args.random_weights else "model", "questions": len(rows),
        "median_prompt_tokens": statistics.median(r["prompt_tokens"] for r in rows),
        "full_ms_median": statistics.median(r["full_s"] for r in rows) * 1e3,
        "ratio_median": {s: statistics.median(r[s] / r["full_s"] for r in rows) for s in chosen},
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
