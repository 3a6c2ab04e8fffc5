"""CPU generation benchmark: our engine vs Hugging Face transformers on the same weights, in one run.

Both run the default model (SmolLM2-135M-Instruct) from the same Q4_1 GGUF, dequantized to float32, with the same
torch thread count:

- prefill: a ~500-token prompt, one forward (ours: `tpa_core.generate.prefill`; transformers: the model's forward
  with `use_cache=True, logits_to_keep=1`, what `generate` runs for its first step); tokens/s = prompt / time.
- decode: greedy `generate` of 64 new tokens after that prompt (EOS disabled so every run decodes all 64);
  tokens/s = 63 / (time(64 tokens) - time(first token)): transformers as time(generate 64) - time(generate 1).
- load: the second load of the default model from the model cache (in this process, and in a fresh one).
- weights-only GEMV rate: tokens/s of one F.linear per weight matrix as stored (float32, and bfloat16/float16
  copies): the cost of streaming every weight once per decode step with plain F.linear - a reference for how
  memory-bound decoding is, not a hard ceiling (a better GEMV layout beats it).

Medians of --repeats runs per figure. Our engine is also measured in --extra-dtypes (default float16,quantized,auto;
float16: about twice the decode speed on an AVX-512 CPU, not bit-identical to float32; quantized: the GGUF's blocks
resident, `tpa_core.quant`; auto: what `--weights auto` loads, for this model the blocks for decode, float32
copies of the projections for prefill and a float16 factor cache), against transformers in float32; each also
reports how many of its greedy tokens equal the float32 engine's. llama.cpp is compared in
benchmarks/quantized.py. The report starts with the
conditions that decide CPU speed besides our code (CPU model and vector extensions, torch's CPU capability, MKL and
oneDNN versions, whether our prefill went through oneDNN, the load average at start and end), so that two runs can
be told apart by machine as well as by code.

    .venv/bin/python benchmarks/cpu_generate.py [--threads 1,2] [--repeats 3] [--prompt-tokens 500]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # this checkout's packages first, installed or not

DEFAULT_MODELS_DIR = Path.home() / ".cache" / "tpa-rag-test-models" / "data" / "models"
PASSAGE = (
    "Tensor Product Attention factorizes queries, keys and values into sums of rank-one products of a head "
    "factor and a token factor. Only the factors are cached, so the memory a long context needs shrinks, and "
    "rotary position embeddings commute with the factorization when they are applied to the token factors. "
    "A local assistant can therefore encode a long document once, keep the compact cache on disk, and answer "
    "follow-up questions without paying for the prefill again. "
)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def conditions() -> dict:
    """What decides CPU speed here besides our code: the CPU's vector extensions, torch's build and math
    libraries, and how busy the machine is (a shared machine's load average changes every figure)."""
    flags: list[str] = []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            break
    config = torch.__config__.show()
    libraries = [line.strip(" -") for line in config.splitlines()
                 if "Math Kernel Library" in line or "MKL-DNN" in line or "OpenMP" in line]
    from tpa_core.attention import _onednn

    return {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
        "simd_flags": sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")),
        "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "math_libraries": libraries, "mkl": torch.backends.mkl.is_available(),
        "onednn": torch.backends.mkldnn.is_available(),
        "onednn_linear_used_for_prefill": _onednn["usable"],  # None until a prefill ran; False: F.linear (MKL)
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    k = 0
    while len(ids) < n:
        k += 1
        ids = tokenizer.encode(PASSAGE * k)
    return ids[:n]


class _NoEOS:
    """Our tokenizer with the end-of-sequence ids hidden, so every decode run produces all its tokens."""

    eos_token_ids = ()

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def _without_tokens(value):
    """The report without the generated token lists (long, and only compared inside the run)."""
    if isinstance(value, dict):
        return {k: _without_tokens(v) for k, v in value.items() if k != "greedy_tokens"}
    if isinstance(value, list):
        return [_without_tokens(v) for v in value]
    return value


def median_of(repeats: int, fn) -> float:
    return statistics.median(fn() for _ in range(repeats))


def bench_ours(loaded, ids: list[int], new_tokens: int, repeats: int) -> dict:
    from tpa_core.generate import GenerationConfig, generate, prefill

    model, window = loaded.model, loaded.config.max_position_embeddings

    def one_prefill() -> float:
        cache = model.new_cache(batch_size=1, capacity=len(ids) + new_tokens)
        start = time.perf_counter()
        prefill(model, cache, ids)
        return time.perf_counter() - start

    tokens: list[int] = []

    def one_decode() -> float:
        config = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0)
        events = list(generate(model, _NoEOS(loaded.tokenizer), ids, config))
        assert sum(len(e.token_ids) for e in events) == new_tokens and len(ids) + new_tokens <= window
        tokens[:] = [t for e in events for t in e.token_ids]
        return events[-1].metrics.decode_tokens_per_s

    one_prefill()  # warm-up
    prefill_s = median_of(repeats, one_prefill)
    decode_tps = median_of(repeats, one_decode)
    return {"prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": decode_tps, "greedy_tokens": tokens}


def bench_hf(gguf: Path, ids: list[int], new_tokens: int, repeats: int) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=torch.float32).eval()
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)

    def one_prefill() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)
        assert out.shape[1] == len(ids) + n
        return time.perf_counter() - start

    one_prefill()  # warm-up
    prefill_s = median_of(repeats, one_prefill)
    first = median_of(repeats, lambda: generate(1))
    full = median_of(repeats, lambda: generate(new_tokens))
    return {"prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": (new_tokens - 1) / max(full - first, 1e-9)}


def weight_floor(loaded, repeats: int) -> dict:
    """Tokens/s of one F.linear GEMV per weight matrix of the model (what every decode step streams from memory),
    in float32 as loaded, and with bfloat16 / float16 copies."""
    mats = [p.detach() for p in loaded.model.parameters() if p.dim() == 2]  # embedding doubles as the tied head
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ws = [w.to(dtype) for w in mats]
        xs = {w.shape[1]: torch.randn(1, w.shape[1]).to(dtype) for w in ws}

        def one_pass() -> float:
            start = time.perf_counter()
            for w in ws:
                torch.nn.functional.linear(xs[w.shape[1]], w)
            return time.perf_counter() - start

        one_pass()
        out[str(dtype).replace("torch.", "")] = 1.0 / median_of(repeats, one_pass)
        del ws
    return {"weights_only_decode_tok_s": out}


def load_times(models_dir: Path, name: str) -> dict:
    from tpa_core.loading import load_model

    start = time.perf_counter()
    load_model(name, models_dir, device="cpu")
    in_process = time.perf_counter() - start
    code = ("import time; t = time.perf_counter(); from tpa_core.loading import load_model; "
            f"load_model({name!r}, {str(models_dir)!r}, device='cpu'); print(time.perf_counter() - t)")
    fresh = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 cwd=Path(__file__).parents[1]).stdout.strip())
    return {"load_s_in_process": in_process, "load_s_fresh_process": fresh}


def llama_cpp_status() -> str:
    found = [tool for tool in ("llama-bench", "llama-cli") if shutil.which(tool)]
    if found or importlib.util.find_spec("llama_cpp") is not None:
        return "installed but not measured by this script: " + ", ".join(found or ["llama_cpp"])
    return "not installed (no llama-bench/llama-cli on PATH, no llama_cpp package): not measured"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to measure")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--extra-dtypes", default="float16,quantized,auto",
                        help="comma-separated dtypes (or quantized: the GGUF's blocks resident, tpa_core.quant; "
                             "auto: the product's default weights) to measure our engine in besides float32 ('' "
                             "for none)")
    args = parser.parse_args(argv)

    from tpa_core import registry
    from tpa_core.loading import load_model

    start_conditions = conditions()
    loaded = load_model(args.model, args.models_dir, device="cpu", weights="float")
    extra = {name: load_model(args.model, args.models_dir, device="cpu",
                              **({"weights": name} if name in ("quantized", "auto") else
                                 {"dtype": getattr(torch, name), "weights": "float"}))
             for name in args.extra_dtypes.split(",") if name}
    gguf = registry.download_path(args.model, args.models_dir)
    ids = prompt_ids(loaded.tokenizer, args.prompt_tokens)
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        ours = bench_ours(loaded, ids, args.new_tokens, args.repeats)
        row = {"threads": threads, "ours": ours, **weight_floor(loaded, args.repeats)}
        for name, other in extra.items():
            row[f"ours_{name}"] = bench_ours(other, ids, args.new_tokens, args.repeats)
            # how far the greedy tokens agree with the float32 engine's (the new tokens, from the first)
            same = [a == b for a, b in zip(ours["greedy_tokens"], row[f"ours_{name}"]["greedy_tokens"])]
            row[f"ours_{name}"]["tokens_equal_to_float32"] = same.index(False) if False in same else len(same)
        if not args.skip_hf:
            hf = bench_hf(gguf, ids, args.new_tokens, args.repeats)
            row["transformers"] = hf
            row["prefill_ratio"] = ours["prefill_tok_s"] / hf["prefill_tok_s"]
            row["decode_ratio"] = ours["decode_tok_s"] / hf["decode_tok_s"]
            for name in extra:
                row[f"decode_ratio_{name}"] = row[f"ours_{name}"]["decode_tok_s"] / hf["decode_tok_s"]
        rows.append(row)
    torch.set_num_threads(max(int(t) for t in args.threads.split(",")))
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "conditions_at_start": start_conditions, "conditions_at_end": conditions(),
        "cpu": cpu_model(), "cores": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": None if args.skip_hf else __import__("transformers").__version__,
        "model": args.model, "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "repeats": args.repeats,
        "rows": rows, "llama.cpp": llama_cpp_status(), **load_times(args.models_dir, args.model),
    }
    print(json.dumps(_without_tokens(report), indent=1))
    print("\n| threads | ours prefill tok/s | HF prefill tok/s | ratio | ours decode tok/s | HF decode tok/s | ratio "
          "| weights-only GEMV f32 / bf16 / f16 tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        hf = row.get("transformers", {})
        print(f"| {row['threads']} | {row['ours']['prefill_tok_s']:.0f} | {hf.get('prefill_tok_s', float('nan')):.0f} "
              f"| {row.get('prefill_ratio', float('nan')):.2f}x | {row['ours']['decode_tok_s']:.1f} "
              f"| {hf.get('decode_tok_s', float('nan')):.1f} | {row.get('decode_ratio', float('nan')):.2f}x "
              f"| {' / '.join(f'{v:.1f}' for v in row['weights_only_decode_tok_s'].values())} |")
        for name in extra:
            print(f"|   ours in {name}: prefill {row[f'ours_{name}']['prefill_tok_s']:.0f} tok/s, decode "
                  f"{row[f'ours_{name}']['decode_tok_s']:.1f} tok/s "
                  f"({row.get(f'decode_ratio_{name}', float('nan')):.2f}x transformers float32 decode; first "
                  f"{row[f'ours_{name}']['tokens_equal_to_float32']} greedy tokens equal to float32's) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
