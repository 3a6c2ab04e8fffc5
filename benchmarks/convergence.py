"""Pretraining convergence of MHA, GQA, MQA, TPA, TPA-KVonly and MLA at matched attention parameter counts.

    # here (any machine with Python): tokenize the corpus once, ~3 MB
    python3 benchmarks/convergence.py --prepare-data data/stdlib-bytes.npz
    # on the GPU (sized for under 8 minutes on one H100): every variant, 2 seeds, one process
    python3 benchmarks/convergence.py --data data/stdlib-bytes.npz --out results/convergence
    # a CPU-sized run in under a minute, and the plot (matplotlib) from a run's JSON
    python3 benchmarks/convergence.py --data data/stdlib-bytes.npz --out /tmp/conv --smoke
    python3 benchmarks/convergence.py --plot results/convergence

Every variant has the same blocks, data, batch order (a function of the seed and the step), steps and schedule;
only the attention differs, and its parameters per layer are within 2% of MHA's (`tpa_core.training.variants`
says how the heads are chosen). Held-out loss and bits per byte are measured at 25/50/75/100% of training (and
at `--curve-points` in between for the plot); wall time is the training time without evaluations.
Writes `convergence.json` and `convergence.md` into `--out`; `--plot DIR` draws `convergence.png` from a run's JSON
(into `--out` when given, else into DIR).
Needs only torch, numpy and this checkout's tpa_core (and matplotlib for `--plot`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # this checkout's packages first, installed or not

import torch

from tpa_core.errors import TPAError
from tpa_core.training.data import VOCAB_SIZE, TokenData, prepare
from tpa_core.training.init import INIT_SCHEMES
from tpa_core.training.trainer import TrainConfig, Trainer
from tpa_core.training.variants import VARIANTS, ModelShape, build_variant

log = logging.getLogger("convergence")
QUARTERS = (0.25, 0.5, 0.75, 1.0)
# name -> (d_model, layers, head_dim, seq_len, batch, steps, lr, warmup, eval windows)
SIZES = {
    "gpu": (384, 6, 32, 512, 32, 1000, 2e-3, 100, 128),
    "smoke": (256, 2, 32, 64, 4, 12, 3e-3, 2, 8),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare-data", metavar="PATH", help="tokenize this Python's standard library into PATH")
    p.add_argument("--data", metavar="PATH", help="a file written by --prepare-data")
    p.add_argument("--out", metavar="DIR", help="folder for convergence.json / .md")
    p.add_argument("--plot", metavar="DIR", help="draw convergence.png from DIR/convergence.json (into --out if "
                   "given, else DIR) and exit")
    p.add_argument("--smoke", action="store_true", help="a CPU size that runs in under a minute")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--init", default="normal", choices=INIT_SCHEMES,
                   help="weight init: the modules' normal(0, 0.02), or the paper code's (tpa_core.training.init)")
    p.add_argument("--curve-points", type=int, default=None,
                   help="evaluations along training for the plot (default 16; 4 with --smoke)")
    for name, kind in (("d-model", int), ("layers", int), ("head-dim", int), ("seq-len", int),
                       ("batch-size", int), ("steps", int), ("lr", float), ("warmup", int),
                       ("eval-windows", int)):
        p.add_argument(f"--{name}", type=kind, default=None, help="overrides the size's value")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[ModelShape, TrainConfig, str]:
    """The shape, the training config (seed 0) and the device from the size and the overrides."""
    size = "smoke" if args.smoke else "gpu"
    d, layers, head_dim, seq_len, batch, steps, lr, warmup, windows = SIZES[size]
    pick = {"d_model": d, "layers": layers, "head_dim": head_dim, "seq_len": seq_len, "batch_size": batch,
            "steps": steps, "lr": lr, "warmup": warmup, "eval_windows": windows}
    for key in pick:
        if getattr(args, key) is not None:
            pick[key] = getattr(args, key)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    shape = ModelShape(d_model=pick["d_model"], n_layers=pick["layers"], head_dim=pick["head_dim"],
                       vocab_size=VOCAB_SIZE, context=pick["seq_len"])
    config = TrainConfig(steps=pick["steps"], batch_size=pick["batch_size"], seq_len=pick["seq_len"],
                         lr=pick["lr"], warmup_steps=pick["warmup"], eval_windows=pick["eval_windows"],
                         init=args.init)
    return shape, config, device


def eval_steps(steps: int, curve_points: int) -> list[int]:
    """Steps at which to evaluate: the quarters of training and `curve_points` evenly spaced ones."""
    marks = {max(1, round(steps * q)) for q in QUARTERS}
    marks |= {max(1, round(steps * i / curve_points)) for i in range(1, curve_points + 1)} if curve_points else set()
    return sorted(marks)


def run_one(variant, data: TokenData, config: TrainConfig, device: str, marks: list[int]) -> dict:
    trainer = Trainer(variant, data, config, device)
    start = time.perf_counter()
    for mark in marks:
        trainer.train(until=mark)
    wall = time.perf_counter() - start
    params = sum(p.numel() for p in trainer.model.parameters())
    history = trainer.history.to_list()
    at = {p["step"]: p for p in history}
    quarters = {f"{int(q * 100)}%": at[max(1, round(config.steps * q))] for q in QUARTERS}
    return {"seed": config.seed, "train_seconds": round(trainer.train_seconds, 2), "wall_seconds": round(wall, 2),
            "total_params": params, "tokens_per_second": round(config.steps * config.batch_size * config.seq_len
                                                               / max(trainer.train_seconds, 1e-9)),
            "quarters": {k: {"heldout_loss": v["heldout_loss"], "bits_per_byte": v["bits_per_byte"]}
                         for k, v in quarters.items()},
            "history": history}


def summarize(results: dict) -> dict:
    """Per variant: mean (and min/max over seeds) of the held-out loss and bits per byte at each quarter."""
    out = {}
    for name, entry in results.items():
        runs = entry["runs"]
        quarters = {}
        for key in runs[0]["quarters"]:
            losses = [r["quarters"][key]["heldout_loss"] for r in runs]
            bpbs = [r["quarters"][key]["bits_per_byte"] for r in runs]
            quarters[key] = {"heldout_loss": statistics.fmean(losses), "loss_min": min(losses),
                             "loss_max": max(losses), "bits_per_byte": statistics.fmean(bpbs)}
        out[name] = {"quarters": quarters,
                     "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
                     "tokens_per_second": statistics.fmean(r["tokens_per_second"] for r in runs)}
    return out


def markdown(report: dict) -> str:
    c = report["conditions"]
    conditions = (
        f"Convergence, {c['date']}, {c['device']}, torch {c['torch']}, Python {c['python']}; "
        f"d={c['shape']['d_model']}, {c['shape']['n_layers']} layers, head dim {c['shape']['head_dim']}, "
        f"{c['train']['steps']} steps x {c['train']['batch_size']} x {c['train']['seq_len']} byte tokens, "
        f"seeds {c['seeds']}, init {c['train'].get('init', 'normal')}; "
        f"data: {c['data']['source']} (Python {c['data'].get('python')}, "
        f"{c['data']['train_bytes']:,} train / {c['data']['heldout_bytes']:,} held-out bytes); "
        f"command: `{c['command']}`."
    )
    header = ("| variant | heads | attention params / layer (vs MHA) | KV cache B/token (bf16) | 25% | 50% | 75% "
              "| 100% | bits/byte | train s / run |")
    lines = [
        conditions, "",
        "Held-out loss in nats per byte token (mean over seeds; min-max in brackets at 100%), bits per byte at 100%.",
        "", header, "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["variants"].items():
        s = report["summary"][name]["quarters"]
        end = s["100%"]
        lines.append(
            f"| {name} | {entry['n_heads']} | {entry['attention_params_per_layer']:,} ({entry['mismatch']:+.2%}) "
            f"| {entry['cache_bytes_per_token']:,} | {s['25%']['heldout_loss']:.4f} | {s['50%']['heldout_loss']:.4f} "
            f"| {s['75%']['heldout_loss']:.4f} | {end['heldout_loss']:.4f} [{end['loss_min']:.4f}-"
            f"{end['loss_max']:.4f}] | {end['bits_per_byte']:.4f} | {report['summary'][name]['train_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(folder: Path, out_dir: Path | None = None) -> Path:
    """`convergence.png` (in `out_dir`, default `folder`): held-out loss against step from `folder`'s JSON, mean
    over seeds with the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads((folder / "convergence.json").read_text(encoding="utf-8"))
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for name, entry in report["variants"].items():
        runs = entry["runs"]
        steps = [p["step"] for p in runs[0]["history"]]
        per_step = [[r["history"][i]["heldout_loss"] for r in runs] for i in range(len(steps))]
        mean = [statistics.fmean(v) for v in per_step]
        line, = ax.plot(steps, mean, label=f"{name} ({entry['cache_bytes_per_token']:,} B/token)")
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2,
                        color=line.get_color())
    c = report["conditions"]
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (nats per byte)")
    ax.set_title(f"d={c['shape']['d_model']}, {c['shape']['n_layers']} layers, {len(c['seeds'])} seeds, "
                 f"{c['device']}", fontsize=9)
    last = [statistics.fmean(r["history"][-1]["heldout_loss"] for r in e["runs"]) for e in report["variants"].values()]
    first_quarter = [s["quarters"]["25%"]["heldout_loss"] for s in report["summary"].values()]
    ax.set_ylim(min(last) - 0.05, max(first_quarter) + 0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = (out_dir or folder) / "convergence.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.plot:
        print(plot(Path(args.plot), Path(args.out) if args.out else None))
        return 0
    if args.prepare_data:
        manifest = prepare(args.prepare_data)
        print(json.dumps(manifest, indent=1))
        if not args.data:
            return 0
    if not args.data or not args.out:
        raise SystemExit("--data and --out are needed (or --prepare-data PATH / --plot DIR alone)")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shape, base, device = resolve(args)
        data = TokenData.load(args.data)
        variants = {name: build_variant(shape, name) for name in args.variants}
    except TPAError as exc:
        raise SystemExit(f"error: {exc}") from None
    curve_points = args.curve_points if args.curve_points is not None else (4 if args.smoke else 16)
    marks = eval_steps(base.steps, curve_points)
    results: dict = {}
    started = time.perf_counter()
    for name, variant in variants.items():
        entry = {"n_heads": variant.n_heads, "attention_params_per_layer": variant.attention_params_per_layer,
                 "mismatch": variant.mismatch, "cache_bytes_per_token": variant.cache_bytes_per_token,
                 "config": {k: v for k, v in vars(variant.config).items() if not k.startswith("_")}, "runs": []}
        for seed in args.seeds:
            config = TrainConfig(**{**vars(base), "seed": seed})
            run = run_one(variant, data, config, device, marks)
            log.info("%s seed %d: held-out %.4f at the end, %.1f s", name, seed,
                     run["quarters"]["100%"]["heldout_loss"], run["train_seconds"])
            entry["runs"].append(run)
        results[name] = entry
    total = time.perf_counter() - started
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "CPU"
    report = {
        "conditions": {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device_name,
            "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "command": " ".join(["python3", "benchmarks/convergence.py",
                                                                     *(argv if argv is not None else sys.argv[1:])]),
            "shape": vars(shape), "train": {k: v for k, v in vars(base).items() if k != "seed"},
            "seeds": args.seeds, "eval_steps": marks, "data": data.manifest, "total_seconds": round(total, 1),
        },
        "variants": results,
        "summary": summarize(results),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convergence.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out / "convergence.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    print(f"total {total:.1f} s; wrote {out / 'convergence.json'} and {out / 'convergence.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
