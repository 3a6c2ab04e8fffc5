"""Quantized resident GGUF weights: our engine against llama.cpp on the same files, and quality against float32.

Speed (`speed`): for each GGUF file and thread count, one fresh process per engine, one after the other, `--repeats`
times with the order alternating (medians reported, every run kept in the JSON):

- load: seconds from the engine's load call to a model ready to run (our model cache already holds the file's
  entry: a warm-up load runs first; llama.cpp: `Llama(...)` with the file in the page cache);
- prefill: one forward over `--prompt` token ids (the same ids for both), tokens/s;
- decode: `--new` greedy single-token steps after that prompt, tokens/s;
- peak RSS of the process (VmHWM), the RSS before the load call (the runtime without a model), and the
  file size.

Rates are given per wall-clock second and per CPU second of the process (`time.process_time`): on a shared
machine a descheduled process loses wall time but not CPU time, so with one thread the CPU-time rates are the
steadier comparison (with two, CPU time adds up both threads, so it says nothing about parallel speed).

llama.cpp runs through llama-cpp-python installed in its own environment (`--llama-python`, built from its PyPI
source: `pip install --no-binary llama-cpp-python llama-cpp-python`), never in CI. Both engines get the same
thread count (torch.set_num_threads / n_threads and n_threads_batch).

Quality (`quality`): for the default model's GGUF re-quantized by llama.cpp into each type (`llama_model_quantize`
from the same environment; types it cannot use for a tensor's shape fall back as llama.cpp decides), the
quantized engine's top-1 token against the float32 engine on the same file (gguf's exact dequantization),
teacher-forced over every position of the default-model parity prompts and their 24-token float32 greedy
continuations; and the largest logit difference over the logit range. (The file's own type, Q4_1 with a Q8_0
embedding, is asserted in tests/tpa_core/test_quant.py on the same sequences.)

    .venv/bin/python benchmarks/quantized.py speed FILE.gguf... [--threads 1,2] [--prompt 512] [--new 64] [--repeats 2]
                                                [--levels auto|1|2] [--decode fused|modules]
                                                [--cache auto|float32|float16]
    .venv/bin/python benchmarks/quantized.py quality [--types Q4_0,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

LLAMA_PYTHON = Path("/work/bench-envs/llamacpp/bin/python")
DEFAULT_MODELS_DIR = Path.home() / ".cache" / "tpa-rag-test-models" / "data" / "models"
BENCH_MODELS_DIR = Path(tempfile.gettempdir()) / "tpa-rag-bench-models"

# The llama.cpp side, run by the benchmark environment's interpreter (it has llama_cpp, not tpa_core).
LLAMA_CHILD = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, threads, ids, new = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
def memory_mb(field):  # VmHWM (peak) or VmRSS of this process image: ru_maxrss would carry the parent's peak over
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024

rss_before_load = memory_mb("VmRSS")
start = time.perf_counter()
llm = Llama(model_path=path, n_ctx=len(ids) + new + 16, n_batch=len(ids), n_ubatch=len(ids), n_threads=threads,
            n_threads_batch=threads, verbose=False)
load = time.perf_counter() - start
vocab = llm.n_vocab()

def last_token():  # greedy: the argmax of the last position's logits, as our side does
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

start, cpu = time.perf_counter(), time.process_time()
llm.eval(ids)
prefill, prefill_cpu = time.perf_counter() - start, time.process_time() - cpu
token = last_token()
start, cpu = time.perf_counter(), time.process_time()
for _ in range(new):
    llm.eval([token])
    token = last_token()
decode, decode_cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"load_s": load, "prefill_tok_s": len(ids) / prefill, "decode_tok_s": new / decode,
                  "prefill_tok_per_cpu_s": len(ids) / prefill_cpu, "decode_tok_per_cpu_s": new / decode_cpu,
                  "peak_rss_mb": memory_mb("VmHWM"), "rss_before_load_mb": rss_before_load}))
"""


def ours_child(path: str, threads: int, ids: list[int], new: int, models_dir: str, levels: str = "auto",
               decode_path: str = "fused", cache_dtype: str = "auto") -> dict:
    """Our engine on `path` with quantized resident weights (run in a fresh process by `speed`); `levels`: the
    decode product's activation levels, "auto" (the engine's choice for the file) or "1" / "2" for every matrix;
    `decode_path`: "fused" (the engine's default, one compiled call per block) or "modules" (the module path);
    `cache_dtype`: the factor cache's dtype, "auto" (the engine's choice for the file) or a torch dtype name."""
    import torch

    from tpa_core.loading import load_model
    from tpa_core.quant.resident import resident_matrices

    torch.set_num_threads(threads)
    rss_before_load = memory_mb("VmRSS")  # the runtime, no model yet
    start = time.perf_counter()
    loaded = load_model(path, models_dir, device="cpu", weights="quantized")
    load = time.perf_counter() - start
    model = loaded.model
    model.fused_decode = decode_path == "fused"
    if cache_dtype != "auto":
        model.cache_dtype = getattr(torch, cache_dtype)
    if levels != "auto":  # what the file-size rule (tpa_core.quant.formats.activation_levels) saves or costs
        for part in resident_matrices(model):
            part.levels = int(levels)
    cache = model.new_cache(capacity=len(ids) + new + 16)
    start, cpu = time.perf_counter(), time.process_time()
    logits = model(torch.tensor([ids]), cache, last_only=True)  # [1, 1, V]
    prefill, prefill_cpu = time.perf_counter() - start, time.process_time() - cpu
    token = int(logits[0, -1].argmax())
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(new):
        token = int(model(torch.tensor([[token]]), cache)[0, -1].argmax())
    decode, decode_cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"load_s": load, "prefill_tok_s": len(ids) / prefill, "decode_tok_s": new / decode,
            "prefill_tok_per_cpu_s": len(ids) / prefill_cpu, "decode_tok_per_cpu_s": new / decode_cpu,
            "peak_rss_mb": memory_mb("VmHWM"), "rss_before_load_mb": rss_before_load,
            "cache_mb": cache.nbytes_per_token() * cache.capacity / 2**20,
            "levels": sorted({p.levels for p in model.packed_head.parts}), "decode_path": decode_path,
            "cache_dtype": str(model.cache_dtype).removeprefix("torch.")}


def memory_mb(field: str) -> float:
    """/proc/self/status's `field` (VmHWM: peak RSS, VmRSS: now) in MiB. Unlike `ru_maxrss`, which Linux carries
    over an exec from the parent process, VmHWM belongs to this process image alone."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _run_json(command: list[str], env: dict[str, str] | None = None) -> dict:
    env = env or {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'kernels'}"}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, **env})
    if result.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def llama_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of a llama.cpp child: `--llama-package DIR` runs the llama_cpp package in DIR with the
    shared libraries in DIR/lib (a build tree used as is) instead of the environment's installed one."""
    if args.llama_package is None:
        return {}
    return {"PYTHONPATH": str(args.llama_package), "LLAMA_CPP_LIB_PATH": str(args.llama_package / "lib")}


def prompt_ids(path: Path, n: int) -> list[int]:
    """n token ids spread over the file's vocabulary, past its first 300 (specials and bytes)."""
    from tpa_core.gguf import GGUFFile

    vocab = GGUFFile(path).hf_config()["vocab_size"]
    return [300 + (i * 7919) % (vocab - 300) for i in range(n)]


def speed(args: argparse.Namespace) -> dict:
    rows = []
    for file in args.files:
        ids = prompt_ids(file, args.prompt)
        ours_cmd = [sys.executable, __file__, "ours-child", str(file), "--models-dir", str(args.models_dir),
                    "--new", str(args.new), "--levels", args.levels, "--decode", args.decode,
                    "--cache", args.cache, "--ids", json.dumps(ids)]
        # writes our model-cache entry and brings the file into the page cache for both engines
        _run_json([*ours_cmd[:-2], "--ids", json.dumps(ids[:8]), "--threads", "1"])
        for threads in (int(t) for t in args.threads.split(",")):
            runs: dict[str, list[dict]] = {"ours": [], "llama.cpp": []}
            for repeat in range(args.repeats):
                # alternate who goes first, across repeats and rows
                order = ("ours", "llama.cpp") if (repeat + len(rows)) % 2 == 0 else ("llama.cpp", "ours")
                for engine in order:
                    if engine == "ours":
                        runs[engine].append(_run_json([*ours_cmd, "--threads", str(threads)]))
                    else:
                        runs[engine].append(_run_json([str(args.llama_python), "-c", LLAMA_CHILD, str(file),
                                                       str(threads), json.dumps(ids), str(args.new)],
                                                      llama_env(args)))
            ours, llama = _median(runs["ours"]), _median(runs["llama.cpp"])
            row = {"file": file.name, "file_mb": file.stat().st_size / 2**20, "threads": threads, "ours": ours,
                   "llama.cpp": llama, "runs": runs, "load_avg": os.getloadavg()[0]}
            for key in ("prefill_tok_s", "decode_tok_s", "prefill_tok_per_cpu_s", "decode_tok_per_cpu_s"):
                row[f"{key}_ratio"] = ours[key] / llama[key]
            row["load_ratio"] = ours["load_s"] / llama["load_s"]
            row["peak_rss_over_file"] = ours["peak_rss_mb"] / row["file_mb"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"rows": rows}


def _median(runs: list[dict]) -> dict:
    """Each measure's median over the repeats (the lower middle value for an even count)."""
    return {key: sorted(run[key] for run in runs)[(len(runs) - 1) // 2] for key in runs[0]}


def quality(args: argparse.Namespace) -> dict:
    import torch

    from tpa_core import registry
    from tpa_core.loading import load_model

    source = registry.download_path("smollm2-135m-instruct", args.default_models_dir)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types.split(","):
            target = Path(tmp) / f"smollm2-{qtype.lower()}.gguf"
            _requantize(args.llama_python, llama_env(args), source, target, qtype)
            quantized = load_model(target, Path(tmp) / "models", device="cpu", weights="quantized")
            floating = load_model(target, Path(tmp) / "models", device="cpu", weights="float")
            types = sorted({p.type_name for b in quantized.model.layers for layer in
                            (*b.attn.packed.values(), *b.mlp.packed.values()) for p in layer.parts})
            agree = total = 0
            worst = 0.0
            for ids in sequences(floating):
                ids = torch.tensor([ids])
                # one token at a time: every position runs the decode (int8) path, the one that rounds most
                cache_q, cache_f = quantized.model.new_cache(capacity=ids.shape[1]), \
                    floating.model.new_cache(capacity=ids.shape[1])
                for pos in range(ids.shape[1]):
                    step = ids[:, pos:pos + 1]
                    a, b = quantized.model(step, cache_q)[0, -1], floating.model(step, cache_f)[0, -1]
                    agree += int(a.argmax() == b.argmax())
                    total += 1
                    worst = max(worst, float((a - b).abs().max() / (b.max() - b.min())))
            row = {"type": qtype, "matrix_types": types, "positions": total, "top1_agreement": agree / total,
                   "max_logit_diff_over_range": worst}
            print(json.dumps(row), flush=True)
            out.append(row)
    return {"rows": out}


def sequences(floating) -> list[list[int]]:
    """The default-model parity prompts (tests/tpa_core/test_default_model.py), each followed by the float32
    model's 24 greedy tokens: the sequences tests/tpa_core/test_quant.py teacher-forces too."""
    from tpa_core.generate import GenerationConfig, generate

    sys.path.insert(0, str(ROOT / "tests" / "tpa_core"))
    from test_default_model import CONVERSATIONS, RAW_PROMPTS

    tokenizer = floating.tokenizer
    prompts = [tokenizer.encode(text) for text in RAW_PROMPTS] + [tokenizer.encode_chat(t) for t in CONVERSATIONS]
    config = GenerationConfig(max_new_tokens=24, temperature=0.0)
    return [ids + [t for e in generate(floating.model, tokenizer, ids, config) for t in e.token_ids]
            for ids in prompts]


def _requantize(llama_python: Path, env: dict[str, str], source: Path, target: Path, qtype: str) -> None:
    code = ("import sys, llama_cpp as l; p = l.llama_model_quantize_default_params(); "
            f"p.ftype = l.LLAMA_FTYPE_MOSTLY_{qtype}; p.allow_requantize = True; "
            "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
    subprocess.run([str(llama_python), "-c", code, str(source), str(target)], check=True, capture_output=True,
                   env={**os.environ, **env})


def conditions() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(),
            "simd": [f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")],
            "torch": torch.__version__, "load_avg_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("files", nargs="+", type=Path)
    sp.add_argument("--threads", default="1,2")
    sp.add_argument("--prompt", type=int, default=512)
    sp.add_argument("--new", type=int, default=64)
    sp.add_argument("--repeats", type=int, default=1, help="runs per engine and row, alternating which goes first")
    sp.add_argument("--models-dir", type=Path, default=BENCH_MODELS_DIR)
    sp.add_argument("--llama-python", type=Path, default=LLAMA_PYTHON)
    sp.add_argument("--llama-package", type=Path, default=None)
    sp.add_argument("--levels", choices=("auto", "1", "2"), default="auto",
                    help="our decode's activation levels: the engine's choice for each file, or 1 / 2 for all")
    sp.add_argument("--decode", choices=("fused", "modules"), default="fused",
                    help="our decode steps: one compiled call per block (the default) or the module path")
    sp.add_argument("--cache", choices=("auto", "float32", "float16"), default="auto",
                    help="our factor cache's dtype: the engine's choice for each file, or one for all")
    qp = sub.add_parser("quality")
    qp.add_argument("--types", default="Q4_0,Q5_0,Q5_1,Q8_0,Q4_K_M,Q5_K_M,Q6_K")
    qp.add_argument("--default-models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    qp.add_argument("--llama-python", type=Path, default=LLAMA_PYTHON)
    qp.add_argument("--llama-package", type=Path, default=None)
    child = sub.add_parser("ours-child")
    child.add_argument("file")
    child.add_argument("--threads", type=int, required=True)
    child.add_argument("--ids", required=True)
    child.add_argument("--new", type=int, required=True)
    child.add_argument("--models-dir", required=True)
    child.add_argument("--levels", default="auto")
    child.add_argument("--decode", default="fused")
    child.add_argument("--cache", default="auto")
    args = parser.parse_args(argv)
    if args.command == "ours-child":
        print(json.dumps(ours_child(args.file, args.threads, json.loads(args.ids), args.new, args.models_dir,
                                    args.levels, args.decode, args.cache)))
        return 0
    report = {"conditions": conditions(), "command": " ".join(sys.argv)}
    report.update(speed(args) if args.command == "speed" else quality(args))
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
