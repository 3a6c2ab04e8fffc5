"""Engine commands: `tpa-rag generate`, `tpa-rag chat`, `tpa-rag models fetch|list`.

    tpa-rag generate [--raw] [--json] [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K]
                     [--seed S] [--system TEXT] [--dtype D] [--weights W] [--threads N] PROMPT
                     (PROMPT "-" or absent: read stdin)
    tpa-rag chat [--max-new-tokens N] [--temperature T] ... [--system TEXT] [--dtype D] [--weights W] [--threads N]
    tpa-rag models fetch [NAME]
    tpa-rag models list [--json]      (each cached model's weights form and resident size)

The model is `--model` (a known name, a .gguf file or a model folder), loaded through the model cache under
`<data-dir>/models`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from app.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="generate a continuation or an answer for one prompt",
                                description="Stream the model's answer to PROMPT (chat template applied "
                                            "unless --raw) to stdout.")
    _add_sampling_args(gen)
    gen.add_argument("--raw", action="store_true", help="feed PROMPT as is, without the chat template")
    gen.add_argument("--json", action="store_true",
                     help='print one JSON object {"text", "token_ids", "prompt_tokens", "metrics"} at the end')
    gen.add_argument("prompt", nargs="?", default="-", metavar="PROMPT", help="the prompt ('-' or none: stdin)")
    gen.set_defaults(handler=cmd_generate)

    chat = subparsers.add_parser("chat", help="interactive multi-turn chat in the terminal",
                                 description="Chat with the model: one line per turn on stdin; /reset starts "
                                             "over, /exit (or end of input) quits.")
    _add_sampling_args(chat)
    chat.set_defaults(handler=cmd_chat)

    models = subparsers.add_parser("models", help="fetch and list models")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    fetch = sub.add_parser("fetch", help="download (if needed) and convert a model into the model cache")
    fetch.add_argument("name", nargs="?", help="a known model name or a local path (default: --model)")
    fetch.set_defaults(handler=cmd_models_fetch)
    listing = sub.add_parser("list", help="known models and the converted models in the cache")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=cmd_models_list)
    models.set_defaults(handler=lambda args, settings: _usage(models))


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="most tokens to generate (default from the settings, 256)")
    parser.add_argument("--temperature", type=float, default=None, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (1.0 = off)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="top-k sampling (0 = off)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling")
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system message for the chat template")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "q4"), default=None,
                        help="weight/activation dtype of float weights (default: float32 on the CPU, bfloat16 on "
                             "CUDA); float16 decodes about 2x faster on an AVX-512 CPU but is not bit-identical to "
                             "float32; q4: the older spelling of --weights quantized")
    parser.add_argument("--weights", choices=("auto", "float", "quantized"), default=None,
                        help="quantized: a GGUF model's matrices stay in their quantized blocks (CPU; about the "
                             "file's size in memory, faster decoding, decode activations rounded in two 8-bit "
                             "levels); float: convert to --dtype; auto (default, or TPA_RAG_WEIGHTS): quantized for "
                             "GGUF files of 256 MiB and more; from 16 MiB (the default model) quantized for "
                             "decoding with float32 copies for prefill; float below")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice; decoding is memory-bound, and on a "
                             "busy 2-core machine 1 thread is several times faster than 2)")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _generation_config(args: argparse.Namespace, settings: Settings):
    from tpa_core.generate import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else settings.max_new_tokens,
        temperature=args.temperature if args.temperature is not None else settings.temperature,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _load(settings: Settings, args: argparse.Namespace):
    import torch

    from app.errors import AppError
    from tpa_core.loading import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise AppError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    weights = args.weights or settings.weights
    if args.dtype == "q4":
        if args.weights not in (None, "quantized"):
            raise AppError(f"--dtype q4 means --weights quantized; it contradicts --weights {args.weights}")
        return load_model(settings.model, settings.models_dir, device=settings.device, weights="quantized")
    dtype = getattr(torch, args.dtype) if args.dtype else None  # with weights "auto", a 16-bit dtype means float
    return load_model(settings.model, settings.models_dir, device=settings.device, dtype=dtype, weights=weights)


def _messages(system: str | None, turns: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + turns


# ----- generate --------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from app.errors import AppError
    from tpa_core.generate import generate

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise AppError("the prompt is empty")
    config = _generation_config(args, settings)
    loaded = _load(settings, args)
    tokenizer = loaded.tokenizer
    if args.raw:
        prompt_ids = tokenizer.encode(prompt)
    else:
        prompt_ids = tokenizer.encode_chat(_messages(args.system, [{"role": "user", "content": prompt}]))
    token_ids: list[int] = []
    pieces: list[str] = []
    metrics = None
    for event in generate(loaded.model, tokenizer, prompt_ids, config):
        token_ids.extend(event.token_ids)
        pieces.append(event.text)
        if not args.json and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        if event.done:
            metrics = event.metrics
    if args.json:
        out: dict[str, Any] = {
            "text": "".join(pieces), "token_ids": token_ids, "prompt_tokens": len(prompt_ids),
            "metrics": {"prefill_ms": round(metrics.prefill_ms, 3), "ttft_ms": round(metrics.ttft_ms, 3),
                        "decode_tokens_per_s": round(metrics.decode_tokens_per_s, 3)},
        }
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


# ----- chat ------------------------------------------------------------------------------------------------
def cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    from tpa_core.errors import TPAError
    from tpa_core.generate import common_prefix, generate

    config = _generation_config(args, settings)
    loaded = _load(settings, args)
    tokenizer, model = loaded.tokenizer, loaded.model
    if tokenizer.chat_template is None:
        raise TPAError(f"{loaded.name} has no chat template; use `tpa-rag generate --raw`")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{loaded.name} ({loaded.config.n_layers} layers, context {loaded.context_window} tokens). "
              f"/reset starts over, /exit quits.", file=sys.stderr)
    turns: list[dict[str, str]] = []
    cache = model.new_cache(batch_size=1)
    cached_ids: list[int] = []  # the tokens whose factors `cache` holds
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            turns, cached_ids = [], []
            cache.truncate(0, 0)
            print("(conversation cleared)", file=sys.stderr)
            continue
        candidate = turns + [{"role": "user", "content": text}]
        try:
            prompt_ids = tokenizer.encode_chat(_messages(args.system, candidate))
            # Keep the cached factors of the longest common prefix (earlier turns); prefill only the rest.
            common = common_prefix(cached_ids, prompt_ids)
            cache.truncate(0, common)
            cached_ids = cached_ids[:common]
            reply_ids: list[int] = []
            pieces: list[str] = []
            if interactive:
                print("assistant> ", end="", file=sys.stderr, flush=True)
            for event in generate(model, tokenizer, prompt_ids, config, cache=cache):
                reply_ids.extend(event.token_ids)
                pieces.append(event.text)
                sys.stdout.write(event.text)
                sys.stdout.flush()
        except TPAError as exc:
            print(f"\ntpa-rag: error: {exc} (use /reset to start over)", file=sys.stderr)
            cache.truncate(0, 0)
            cached_ids = []
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        cached_ids = prompt_ids + reply_ids[:-1]  # generate leaves the last sampled token out of the cache
        turns = candidate + [{"role": "assistant", "content": "".join(pieces)}]
    return 0


# ----- models ----------------------------------------------------------------------------------------------
def cmd_models_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from tpa_core import registry
    from tpa_core.loading import load_model

    name = args.name or settings.model
    if name in registry.KNOWN_MODELS:
        already = registry.is_fetched(name, settings.models_dir)
        path = registry.fetch(name, settings.models_dir)
        print(f"{name}: {'already fetched' if already else 'fetched'} ({path})")
    loaded = load_model(name, settings.models_dir, device="cpu", require_tokenizer=False, weights=settings.weights)
    print(f"{loaded.name}: ready ({loaded.weights} weights), fingerprint {loaded.fingerprint} ({loaded.cache_dir})")
    return 0


def cmd_models_list(args: argparse.Namespace, settings: Settings) -> int:
    from tpa_core import registry
    from tpa_core.loading import list_cached

    known = [{"name": spec.name, "description": spec.description, "license": spec.license,
              "fetched": registry.is_fetched(spec.name, settings.models_dir),
              "source": f"pypi:{spec.package}=={spec.version}"} for spec in registry.KNOWN_MODELS.values()]
    cached = list_cached(settings.models_dir)
    if args.json:
        print(json.dumps({"known": known, "cached": cached}, indent=1))
        return 0
    print("Known models:")
    for entry in known:
        state = "fetched" if entry["fetched"] else "not fetched"
        print(f"  {entry['name']:<24} {state:<12} {entry['description']}")
    print(f"Converted models in {settings.models_dir} (resident: the memory its weights take when loaded):")
    if not cached:
        print("  (none; run `tpa-rag models fetch`)")
    weights_width = max((len(entry["weights"]) for entry in cached), default=0)
    for entry in cached:
        resident = "?" if entry["resident_mb"] is None else f"{entry['resident_mb']:.1f} MB"
        print(f"  {entry['name']:<24} {entry['fingerprint'][:12]}  {entry['weights']:<{weights_width}}  "
              f"resident {resident:>11}  {entry['source']}")
    return 0
