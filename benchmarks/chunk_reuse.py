"""Chunk reuse against full prefill, on CPython's standard library and questions written for it.

    python benchmarks/chunk_reuse.py [--limit N] [--threads 1] [--top-k 5] [--json OUT]

For each question (benchmarks/questions/cpython_extractive.json, then optionally those of
benchmarks/retrieval_questions.json with --retrieval-questions), the app's retrieval picks the top-k chunks of the
modules listed in retrieval_questions.json (this interpreter's Lib/), the app lays out the prompt, and then:

- full: a plain prefill of the whole prompt (the reference);
- each setting: the prompt's chunks assembled from chunk caches (encoded beforehand, untimed: "the chunks of the
  collection are already encoded"), the first k tokens of each chunk recomputed and/or the share r of chunk
  tokens that deviate most (CacheBlend-like), then the rest prefilled.

Per setting: time to first token (the median ratio to full prefill's, measured side by side in one process),
top-1 agreement and mean KL(full || setting) of the next-token distributions over the full-prefill greedy answer
(teacher forced, its first 64 tokens), how many 32-token greedy answers equal full prefill's, and extractive
accuracy (the greedy answer contains every expected string) paired per question with full prefill's. It also
reports how much of each prompt exact prefix reuse alone covers (the longest common token prefix with an
earlier question's prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SETTINGS = {  # name -> (boundary tokens per chunk, recompute ratio)
    "k0": (0, 0.0),
    "k16": (16, 0.0),
    "k32": (32, 0.0),
    "r15": (0, 0.15),
    "k16+r15": (16, 0.15),
    "r30": (0, 0.30),
}
TF_TOKENS = 64
EQUAL_TOKENS = 32
ANSWER_TOKENS = 32


def correct(answer: str, must: list[str]) -> bool:
    """Every expected string is in the answer (case-insensitive; words and numbers as whole tokens)."""
    low = answer.lower()
    for item in must:
        needle = re.escape(item.lower())
        if item[:1].isalnum():
            needle = r"(?<![\w.])" + needle
        if item[-1:].isalnum():
            needle += r"(?![\w])"
        if not re.search(needle, low):
            return False
    return True


def greedy(model, cache, logits: torch.Tensor, n: int, eos: set[int]) -> list[int]:
    """n greedy tokens after the prompt whose last logits are `logits` (stops at an end token)."""
    out: list[int] = []
    for _ in range(n):
        tok = int(logits.argmax())
        out.append(tok)
        if tok in eos:
            break
        logits = model(torch.tensor([[tok]]), cache, last_only=True)[0, -1]
    return out


def teacher_forced(model, cache, logits: torch.Tensor, answer: list[int]) -> torch.Tensor:
    """Log-probabilities `[len(answer), V]` of each answer token's position, the answer fed in."""
    rest = model(torch.tensor([answer[:-1]]), cache)[0] if len(answer) > 1 else logits[None][:0]  # [n-1, V]
    return torch.log_softmax(torch.cat([logits[None], rest]), dim=-1)  # [n, V]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--models-dir", default=None, help="the model cache (default: the app's)")
    parser.add_argument("--stdlib", default=None, help="CPython's Lib/ (default: this interpreter's)")
    parser.add_argument("--start", type=int, default=0, help="skip the first N extractive questions")
    parser.add_argument("--limit", type=int, default=0, help="at most N extractive questions (0 = all)")
    parser.add_argument("--retrieval-questions", type=int, default=0,
                        help="also the first N questions of retrieval_questions.json (token metrics only)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of " +
                        ", ".join(SETTINGS))
    parser.add_argument("--json", help="write the per-question rows and the summary here")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "tpa-chunk-reuse-bench"),
                        help="working folder: the copied modules, the index and the caches (kept for the next run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # benchmarks/retrieval.py would shadow the retrieval package when this file runs as a script
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

    import shutil
    import sysconfig

    from app.asking import plan_prompt
    from app.chunk_reuse import ReuseSetting, restore_assembled
    from app.context import canonical
    from app.service import ChatService
    from app.settings import Settings
    from tpa_core.generate import prefill

    stdlib = Path(args.stdlib or sysconfig.get_paths()["stdlib"])
    spec = json.loads((HERE / "retrieval_questions.json").read_text())
    extractive = json.loads((HERE / "questions" / "cpython_extractive.json").read_text())["questions"]
    extractive = extractive[args.start:args.start + args.limit if args.limit else None]
    questions = [dict(q, kind="extractive") for q in extractive]
    questions += [{"q": q["q"], "kind": "retrieval"} for q in spec["questions"][:args.retrieval_questions]]
    chosen = [s for s in args.settings.split(",") if s]

    work = Path(args.work)
    source = work / "Lib"
    for module in spec["modules"]:
        (source / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stdlib / module, source / module)
    from tpa_core.loading import load_model

    settings = Settings(data_dir=work / "data", model=args.model, device="cpu")
    models_dir = Path(args.models_dir) if args.models_dir else Settings.from_env().models_dir

    loaded = load_model(args.model, models_dir, device="cpu")
    service = ChatService(settings, model=loaded)
    t0 = time.perf_counter()
    service.ingest_paths("stdlib", [str(source)])
    print(f"indexed {len(spec['modules'])} modules in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    model, tokenizer = loaded.model, loaded.tokenizer
    store, namespace = service.store, service.namespace()
    eos = set(tokenizer.eos_token_ids)
    budget = loaded.context_window - ANSWER_TOKENS

    rows, earlier = [], []
    for n, item in enumerate(questions, 1):
        units = canonical(service._retrieved_units("stdlib", item["q"], args.top_k))
        plan = plan_prompt(tokenizer, units, [], item["q"], hits={u.sort_key for u in units}, budget=budget,
                           pinned=False)
        ids = plan.prompt_ids
        row = {"q": item["q"], "kind": item["kind"], "prompt_tokens": len(ids),
               "chunk_tokens_in_prompt": sum(s.end - s.start for s in plan.spans),
               "retrieved_file": any(u.path.endswith(item.get("file", "\0")) for u in units),
               "exact_prefix": max((len(os.path.commonprefix([ids, e])) for e in earlier), default=0)}
        earlier.append(ids)
        if not plan.spans:
            print(f"[{n}] spans unavailable; skipped", file=sys.stderr)
            continue
        cache = model.new_cache(capacity=len(ids) + TF_TOKENS + ANSWER_TOKENS)
        t = time.perf_counter()
        logits = prefill(model, cache, ids)
        row["full_ttft_s"] = time.perf_counter() - t
        answer = greedy(model, cache, logits, max(TF_TOKENS, ANSWER_TOKENS), eos)
        ref_answer = answer[:TF_TOKENS]
        cache.truncate(0, len(ids))
        ref_lp = teacher_forced(model, cache, logits, ref_answer)
        text = tokenizer.decode(answer[:ANSWER_TOKENS])
        row["full_answer"] = text
        row["full_correct"] = correct(text, item["must_contain"]) if item["kind"] == "extractive" else None
        # Encode this prompt's chunk caches once, untimed (a setting with no recompute loads every one).
        warm = model.new_cache(capacity=len(ids))
        restore_assembled(model, store, namespace, ids, warm, plan.spans, ReuseSetting(0, 0.0), "bench")
        for name in chosen:
            k, ratio = SETTINGS[name]
            cache.reset()
            t = time.perf_counter()
            done = restore_assembled(model, store, namespace, ids, cache, plan.spans, ReuseSetting(k, ratio),
                                     "bench")
            logits = prefill(model, cache, ids[cache.length(0):])
            ttft = time.perf_counter() - t
            start = cache.length(0)
            lp = teacher_forced(model, cache, logits, ref_answer)
            cache.truncate(0, start)
            mine = greedy(model, cache, logits, ANSWER_TOKENS, eos)
            text = tokenizer.decode(mine)
            kl = torch.sum(ref_lp.exp() * (ref_lp - lp), dim=-1)  # [n]
            row[name] = {
                "ttft_s": ttft, "ratio": ttft / row["full_ttft_s"],
                "top1": float((lp.argmax(-1) == torch.tensor(ref_answer)).float().mean()),
                "kl": float(kl.mean()),
                "equal32": mine[:EQUAL_TOKENS] == answer[:EQUAL_TOKENS],
                "correct": correct(text, item["must_contain"]) if item["kind"] == "extractive" else None,
                "chunk_tokens": done.chunk_tokens, "recomputed_tokens": done.recomputed_tokens,
                "answer": text,
            }
        rows.append(row)
        if args.json:  # after every question, so a run cut short still leaves its rows
            Path(args.json).write_text(json.dumps({"summary": summarize(rows, chosen), "rows": rows}, indent=1))
        print(f"[{n}/{len(questions)}] {len(ids)} tokens, full {row['full_ttft_s']:.2f} s " + " ".join(
            f"{s} x{row[s]['ratio']:.2f}/{row[s]['top1']:.2f}" for s in chosen), file=sys.stderr)
    summary = summarize(rows, chosen)
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    service.close()


def summarize(rows: list[dict], chosen: list[str]) -> dict:
    """Per setting: median TTFT ratio, mean top-1 and KL, 32-token equality count, and paired accuracy."""
    graded = [r for r in rows if r["kind"] == "extractive"]
    out = {"questions": len(rows), "extractive": len(graded),
           "full_correct": sum(r["full_correct"] for r in graded),
           "answer_file_retrieved": sum(r["retrieved_file"] for r in graded),
           "median_prompt_tokens": statistics.median(r["prompt_tokens"] for r in rows) if rows else 0,
           "exact_prefix_share": (sum(r["exact_prefix"] for r in rows) / sum(r["prompt_tokens"] for r in rows)
                                  if rows else 0.0),
           "median_full_ttft_s": statistics.median(r["full_ttft_s"] for r in rows) if rows else 0.0,
           "settings": {}}
    for name in chosen:
        cells = [r[name] for r in rows]
        won = sum(1 for r in graded if r[name]["correct"] and not r["full_correct"])
        lost = sum(1 for r in graded if r["full_correct"] and not r[name]["correct"])
        out["settings"][name] = {
            "median_ttft_ratio": statistics.median(c["ratio"] for c in cells),
            "top1": statistics.fmean(c["top1"] for c in cells),
            "mean_kl": statistics.fmean(c["kl"] for c in cells),
            "equal32": sum(c["equal32"] for c in cells),
            "correct": sum(r[name]["correct"] for r in graded),
            "won": won, "lost": lost,
            "net_loss_per_100": 100 * (lost - won) / len(graded) if graded else 0.0,
            "recomputed_share": statistics.fmean(
                c["recomputed_tokens"] / max(1, c["recomputed_tokens"] + c["chunk_tokens"]) for c in cells),
        }
    return out


if __name__ == "__main__":
    main()
