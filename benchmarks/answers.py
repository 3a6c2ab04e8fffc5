"""Answer accuracy of the product's own ask path (`app.service.ChatService`) on fixed-answer question sets.

    .venv/bin/tpa-rag models fetch            # once: the default model into the data folder's model cache
    .venv/bin/python benchmarks/answers.py --data-dir DIR --sets cpython click --half tuning \
        --settings today k=2 k=1 budget=320 --out OUT_DIR [--threads 1] [--chunk-tokens N] [--weights W]

Each set (benchmarks/questions/*.json, see `answer_scoring`) is ingested as its own collection (for CPython the
54 standard-library modules of retrieval_questions.json, as the chunk-reuse benchmark does; for click the whole
package). Every question is asked in a new session, greedy,
48 new tokens, through `ChatService.ask` - retrieval, context order, chat template, prefix cache and all. The
store is cleared before each setting, so reused tokens are what the setting itself gets across its questions.

A setting is `today` (5 chunks, canonical order: the defaults before this benchmark), `model` (the per-model
default of `app.retrieval_plan`), or `+`-joined changes: `k=N` (a fixed top-k), `budget=T` (a context token
budget), `order=relevance`, `hybrid`, `focus=N` (N question-relevant lines of each chunk, `app.focus`),
`prompt=NAME` (an instruction of `PROMPTS` after the system prompt), `contrast=A` (context-aware decoding with
weight A, `tpa_core.generate`).
Per setting it reports accuracy with a 95% Wilson interval, partially right answers, answers whose cited
sources hold the answer, median time to first token, mean prompt and reused tokens, and how often the
grounding note fires on right and on wrong answers. With --follow-ups N, the first N questions of the half each
get the next question of the half as a follow-up in their session (1 new token: only its prompt matters), and
the share of the follow-up's prompt restored as an exact prefix is reported. With --chunk-tokens N the sets
are ingested in N-token chunks (a fifth overlapping) into collections of their own (the product chunks at 200).
JSON and a markdown table go to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "benchmarks")]  # this checkout's packages first

from answer_scoring import PARTIAL, RIGHT, holds_answer, load_set, score, split, wilson

QUESTIONS = ROOT / "benchmarks" / "questions"
MAX_NEW_TOKENS = 48
# Wordings of the system prompt compared by `prompt=NAME`: appended to the product's own (AskOptions.instructions).
PROMPTS = {
    "exact": "Answer in one short sentence that quotes the exact name, value or string from the context.",
    "quote": "First copy the line of the context that answers the question, then answer in a few words.",
    "brief": "Give the answer in a few words, using the name or value exactly as the context writes it.",
    # a worked example (a made-up function, in no question set's sources)
    "example": "For example, if the context holds `def connect(host, port=5432, timeout=10.0):` and the question is "
               "\"What is the default port of connect?\", the answer is \"The default port is 5432 [1].\"",
}


def _sets() -> dict[str, tuple[Path, Path, list[str] | None]]:
    """name -> (question file, source root, files to ingest; None = the files the questions name)."""
    import sysconfig

    import click

    click_root = Path(click.__file__).parent
    modules = json.loads((ROOT / "benchmarks" / "retrieval_questions.json").read_text(encoding="utf-8"))["modules"]
    return {
        "cpython": (QUESTIONS / "cpython_extractive.json", Path(sysconfig.get_paths()["stdlib"]), modules),
        "click": (QUESTIONS / "click_extractive.json", click_root,
                  sorted(p.name for p in click_root.glob("*.py"))),
    }


def parse_setting(spec: str) -> dict:
    """AskOptions fields for a setting name (module docstring)."""
    if spec == "today":
        return {"top_k": 5, "context_order": "canonical"}
    if spec == "model":
        return {}
    options: dict = {}
    for part in spec.split("+"):
        key, _, value = part.partition("=")
        if key == "k":
            options["top_k"] = int(value)
        elif key == "budget":
            options["context_tokens"] = int(value)
        elif key == "order" and value in ("canonical", "relevance"):
            options["context_order"] = value
        elif key == "hybrid" and not value:
            options["hybrid"] = True
        elif key == "focus":
            options["context_focus"] = int(value)
        elif key == "prompt" and value in PROMPTS:
            options["instructions"] = PROMPTS[value]
        elif key == "contrast":
            options["contrast"] = float(value)
        else:
            raise SystemExit(f"unknown setting part {part!r} in {spec!r}: use today, model, k=N, budget=T, "
                             "order=canonical|relevance, hybrid, focus=LINES, prompt=" + "|".join(PROMPTS) +
                             ", contrast=WEIGHT, joined with +")
    return options


def run_setting(service, collection: str, questions: list[dict], options: dict, follow_ups: int = 0) -> list[dict]:
    """Ask every question in a new session; one record per question (with its follow-up's reuse where asked).
    Each session is deleted after its question, so its pins do not fill the store for the questions after it."""
    from app.service import AskOptions

    for info in service.sessions(collection):  # the benchmark's own sessions of an earlier run
        service.delete_session(info.id)
    service.clear_cache()
    records = []
    for position, item in enumerate(questions):
        result = service.ask(item["question"], collection,
                             options=AskOptions(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, **options))
        follow_up = {}
        if position < follow_ups and position + 1 < len(questions):
            second = service.ask(questions[position + 1]["question"], collection, result.session_id,
                                 options=AskOptions(max_new_tokens=1, temperature=0.0, **options))
            follow_up = {"follow_up_prompt_tokens": second.metrics["prompt_tokens"],
                         "follow_up_reused_tokens": second.metrics["reused_tokens"]}
        service.delete_session(result.session_id)
        verdict = score(result.answer, item["answers"])
        records.append({
            "id": item["id"], "verdict": verdict, "answer": result.answer,
            "cited_holds_answer": any(holds_answer(s.get("text") or "", item["answers"]) for s in result.sources),
            "sources": [s["path"] for s in result.sources],
            "ungrounded_terms": result.metrics.get("ungrounded_terms", []),
            **{k: result.metrics[k] for k in ("ttft_ms", "prompt_tokens", "reused_tokens")}, **follow_up,
        })
        logging.info("%s %s %r", item["id"], verdict, result.answer[:80])
    return records


def summarize(records: list[dict]) -> dict:
    n = len(records)
    right = sum(r["verdict"] == RIGHT for r in records)
    wrong = [r for r in records if r["verdict"] != RIGHT]
    fired_right = sum(bool(r["ungrounded_terms"]) for r in records if r["verdict"] == RIGHT)
    fired_wrong = sum(bool(r["ungrounded_terms"]) for r in wrong)
    low, high = wilson(right, n)
    followed = [r for r in records if "follow_up_prompt_tokens" in r]
    return {
        "n": n, "right": right, "accuracy": right / n if n else 0.0, "ci95": [round(low, 3), round(high, 3)],
        "partial": sum(r["verdict"] == PARTIAL for r in records),
        "cited_holds_answer": sum(r["cited_holds_answer"] for r in records),
        "ttft_ms_median": statistics.median(r["ttft_ms"] for r in records),
        "prompt_tokens_mean": round(statistics.fmean(r["prompt_tokens"] for r in records), 1),
        "reused_tokens_mean": round(statistics.fmean(r["reused_tokens"] for r in records), 1),
        "grounding_fired_right": [fired_right, right],
        "grounding_fired_wrong": [fired_wrong, n - right],
        "follow_ups": len(followed),
        "follow_up_reused_share": round(sum(r["follow_up_reused_tokens"] for r in followed)
                                        / max(1, sum(r["follow_up_prompt_tokens"] for r in followed)), 3),
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| set | half | setting | right / n | accuracy (95% CI) | partial | cited source holds answer | "
             "TTFT median ms | prompt tokens | reused tokens | follow-up reused | note fires: right / wrong |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s = row["summary"]
        fr, fw = s["grounding_fired_right"], s["grounding_fired_wrong"]
        follow = f"{s['follow_up_reused_share']:.0%} of {s['follow_ups']}" if s["follow_ups"] else "-"
        lines.append(
            f"| {row['set']} | {row['half']} | {row['setting']} | {s['right']} / {s['n']} | "
            f"{s['accuracy']:.0%} ({s['ci95'][0]:.0%}-{s['ci95'][1]:.0%}) | {s['partial']} | "
            f"{s['cited_holds_answer']} / {s['n']} | {s['ttft_ms_median']:,.0f} | {s['prompt_tokens_mean']:.0f} | "
            f"{s['reused_tokens_mean']:.0f} | {follow} | {fr[0]}/{fr[1]} · {fw[0]}/{fw[1]} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the product's data folder (models fetched into it)")
    parser.add_argument("--sets", nargs="+", default=["cpython", "click"], choices=["cpython", "click"])
    parser.add_argument("--half", choices=["tuning", "held-out", "all"], default="tuning")
    parser.add_argument("--settings", nargs="+", default=["today", "model"])
    parser.add_argument("--limit", type=int, default=0, help="the first N questions of each half only (smoke runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--follow-ups", type=int, default=0,
                        help="the first N questions of each half get a follow-up (exact prefix reuse)")
    parser.add_argument("--chunk-tokens", type=int, default=0,
                        help="ingest the sets in chunks of this many tokens (overlap a fifth) into collections of "
                             "their own, instead of the product's chunking (0)")
    parser.add_argument("--weights", choices=("auto", "float", "quantized"), default="auto",
                        help="how the model holds its weights (the product's --weights; default auto)")
    parser.add_argument("--out", required=True, help="folder for answers.json and answers.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from app.service import ChatService
    from app.settings import Settings

    torch.set_num_threads(args.threads)
    options = {spec: parse_setting(spec) for spec in args.settings}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    service = ChatService(Settings.from_env({}, data_dir=args.data_dir, weights=args.weights))
    rows: list[dict] = []
    try:
        service.warm_up()
        for name in args.sets:
            path, root, files = _sets()[name]
            questions = load_set(path, prefix=name)
            collection = f"answers-{name}" + (f"-c{args.chunk_tokens}" if args.chunk_tokens else "")
            if args.chunk_tokens:
                from retrieval.chunking import ChunkingConfig

                service.corpus.chunking = ChunkingConfig(args.chunk_tokens, args.chunk_tokens // 5)
            if collection not in service.collection_names():
                names = files or sorted({q["file"] for q in questions})
                service.ingest_paths(collection, [str(root / f) for f in names])
            tuning, held_out = split(questions)
            chosen = {"tuning": tuning, "held-out": held_out, "all": questions}[args.half]
            if args.limit:
                chosen = chosen[:args.limit]
            for spec in args.settings:
                started = time.perf_counter()
                records = run_setting(service, collection, chosen, options[spec], args.follow_ups)
                row = {"set": name, "half": args.half, "setting": spec, "options": options[spec],
                       "chunk_tokens": args.chunk_tokens or "product default",
                       "summary": summarize(records), "records": records,
                       "wall_s": round(time.perf_counter() - started, 1)}
                rows.append(row)
                logging.info("%s %s %s: %s", name, args.half, spec, json.dumps(row["summary"]))
                report = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "threads": args.threads, "model": service.model_name,
                          "weights": args.weights,
                          "max_new_tokens": MAX_NEW_TOKENS, "rows": rows}
                (out / "answers.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
                (out / "answers.md").write_text(markdown(rows), encoding="utf-8")
    finally:
        service.close()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
