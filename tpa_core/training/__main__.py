"""`python -m tpa_core.training`: train one model on the byte-level corpus and save it as a T6 checkpoint folder.

    python -m tpa_core.training --prepare-data data/stdlib-bytes.npz          # once
    python -m tpa_core.training --data data/stdlib-bytes.npz --out models/tpa-stdlib \\
        [--variant tpa] [--d-model 384 --layers 6 --head-dim 32 --context 2048] [--steps 2000 ...] \\
        [--checkpoint run.pt --save-every 200]                                # resumes from run.pt if it exists
    tpa-rag generate --model models/tpa-stdlib --raw "def parse_args("

Contextual TPA (`tpa`) and KV-only TPA (`tpa_kvonly`) save as T6 checkpoints with the byte-level tokenizer; the
other variants train and report, but the engine reads only those two forms from a T6 folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from tpa_core.errors import TPAError
from tpa_core.training.data import VOCAB_SIZE, TokenData, byte_tokenizer, prepare
from tpa_core.training.export import save_t6_checkpoint
from tpa_core.training.init import INIT_SCHEMES
from tpa_core.training.trainer import TrainConfig, Trainer
from tpa_core.training.variants import VARIANTS, ModelShape, build_variant

log = logging.getLogger("tpa_core.training")
SAVABLE = ("tpa", "tpa_kvonly")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tpa_core.training", description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare-data", metavar="PATH", help="tokenize this Python's standard library into PATH")
    p.add_argument("--data", metavar="PATH", help="a file written by --prepare-data")
    p.add_argument("--out", metavar="DIR", help="the T6 checkpoint folder to write at the end")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--variant", default="tpa", choices=VARIANTS)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--context", type=int, default=2048, help="the model's context window (>= --seq-len)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=None, help="default: 10%% of --steps")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="normal", choices=INIT_SCHEMES, help="weight init (tpa_core.training.init)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--checkpoint", metavar="PATH", help="resumable checkpoint: resumed from if it exists")
    p.add_argument("--save-every", type=int, default=0, help="write --checkpoint every N steps (0: at the end)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.prepare_data:
            print(json.dumps(prepare(args.prepare_data), indent=1))
            if not args.data:
                return 0
        if not args.data:
            raise TPAError("--data is needed (write the file first with --prepare-data PATH)")
        if args.out and args.variant not in SAVABLE:
            raise TPAError(f"--out saves T6 checkpoints, which hold only {' or '.join(SAVABLE)}; "
                           f"train {args.variant} without --out")
        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
        device = "cpu" if device == "auto" else device
        shape = ModelShape(d_model=args.d_model, n_layers=args.layers, head_dim=args.head_dim,
                           vocab_size=VOCAB_SIZE, context=args.context)
        variant = build_variant(shape, args.variant)
        warmup = args.warmup if args.warmup is not None else args.steps // 10
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                             warmup_steps=warmup, eval_every=args.eval_every, seed=args.seed, init=args.init)
        data = TokenData.load(args.data)
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is not None and checkpoint.is_file():
            trainer = Trainer.resume(checkpoint, variant, data, config, device)
            log.info("resumed %s at step %d", checkpoint, trainer.step)
        else:
            trainer = Trainer(variant, data, config, device)
        every = args.save_every if checkpoint is not None and args.save_every > 0 else config.steps
        while trainer.step < config.steps:
            trainer.train(until=min(config.steps, (trainer.step // every + 1) * every))
            if checkpoint is not None:
                trainer.save(checkpoint)
        if args.out:
            training = {"variant": variant.name, "model_config": variant.config.to_dict(),
                        "train_config": dataclasses.asdict(config), "data": data.manifest,
                        "history": trainer.history.to_list(), "train_seconds": round(trainer.train_seconds, 1),
                        "device": str(device), "torch": torch.__version__}
            save_t6_checkpoint(trainer.model, args.out, byte_tokenizer(), training, overwrite=args.overwrite)
            log.info("saved %s", args.out)
    except TPAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
