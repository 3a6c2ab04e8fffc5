"""Next-token pretraining: AdamW, linear warmup + cosine decay, gradient clipping, held-out loss, checkpoints.

    trainer = Trainer(variant, data, TrainConfig(steps=2000, batch_size=32, seq_len=512), device="cuda")
    trainer.train()                     # or train(until=1000), save(path), later Trainer.resume(path, data)

The model keeps its modules' init (normal, std 0.02) or takes the paper code's (`TrainConfig.init`,
`tpa_core.training.init`). On CUDA the forward and backward run under bf16 autocast over float32 parameters and
optimizer state; on the CPU everything is float32. A step's batch is a pure function of (seed, step)
(`TokenData.train_batch`), the model is initialized from `seed`, and a checkpoint holds the parameters, the
optimizer state and the step, so on the CPU a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tpa_core.errors import TPAError
from tpa_core.training import lm
from tpa_core.training.data import BYTE_VOCAB, TokenData
from tpa_core.training.init import INIT_SCHEMES, initialize
from tpa_core.training.variants import Variant

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "tpa-rag-train-checkpoint/1"


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings; `lr` peaks after `warmup_steps` and decays by a cosine to `lr * min_lr_ratio`."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 0  # 0 = only where `train(until=...)` stops
    eval_windows: int = 64
    seed: int = 0
    init: str = "normal"  # tpa_core.training.init.INIT_SCHEMES: the modules' own init, or the paper code's

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TPAError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not 0 <= self.warmup_steps <= self.steps or self.eval_every < 0:
            raise TPAError(f"TrainConfig: need 0 <= warmup_steps <= steps and eval_every >= 0, got "
                           f"warmup_steps={self.warmup_steps}, steps={self.steps}, eval_every={self.eval_every}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.grad_clip > 0 and self.weight_decay >= 0):
            raise TPAError("TrainConfig: lr and grad_clip must be positive, min_lr_ratio in [0, 1], "
                           "weight_decay >= 0")
        if self.init not in INIT_SCHEMES:
            raise TPAError(f"TrainConfig.init must be one of {INIT_SCHEMES}, got {self.init!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def lr_at(self, step: int) -> float:
        """Learning rate of update `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = max(self.steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        floor = self.lr * self.min_lr_ratio
        return floor + 0.5 * (self.lr - floor) * (1.0 + math.cos(math.pi * progress))


@dataclass
class EvalPoint:
    """Held-out cross-entropy after `step` updates: nats per token and bits per byte; `train_loss` is the mean
    training loss since the previous point; `elapsed_s` the training time so far (evaluation excluded)."""

    step: int
    heldout_loss: float
    bits_per_byte: float
    train_loss: float | None
    elapsed_s: float


@dataclass
class History:
    points: list[EvalPoint] = field(default_factory=list)

    def to_list(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(p) for p in self.points]


class Trainer:
    """Trains one variant on one data set; see the module docstring."""

    def __init__(self, variant: Variant, data: TokenData, config: TrainConfig,
                 device: str | torch.device = "cpu") -> None:
        if config.seq_len > variant.config.max_position_embeddings:
            raise TPAError(f"seq_len {config.seq_len} exceeds the model's context window "
                           f"{variant.config.max_position_embeddings}")
        if variant.config.vocab_size < BYTE_VOCAB + 1:
            raise TPAError(f"the byte-level data needs a vocabulary of at least {BYTE_VOCAB + 1} ids, the model "
                           f"has {variant.config.vocab_size}")
        self.variant, self.data, self.config = variant, data, config
        self.device = torch.device(device)
        torch.manual_seed(config.seed)
        self.model = variant.build(self.device).train()
        initialize(self.model, config.init)
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, config.weight_decay), lr=config.lr,
                                           betas=config.betas, fused=self.device.type == "cuda")
        self.step = 0
        self.history = History()
        self.train_seconds = 0.0
        self._loss_sum = torch.zeros((), device=self.device)  # training loss since the last eval point
        self._loss_count = 0
        self._heldout = data.heldout_windows(config.eval_windows, config.seq_len)

    # ----- training --------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def train_step(self) -> None:
        """One update on the batch of `self.step`."""
        c = self.config
        inputs, targets = self.data.train_batch(c.seed, self.step, c.batch_size, c.seq_len)
        inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr_at(self.step)
        with self._autocast():
            loss = lm.loss(self.model, inputs, targets)
        if self.device.type == "cpu" and not torch.isfinite(loss.detach()):  # on CUDA: checked at evaluate()
            raise TPAError(f"{self.variant.name}: the training loss is {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self._loss_sum += loss.detach()
        self._loss_count += 1
        self.step += 1

    def train(self, until: int | None = None) -> History:
        """Train up to step `until` (default: `config.steps`), evaluating every `eval_every` steps and at the end."""
        until = self.config.steps if until is None else until
        if not self.step <= until <= self.config.steps:
            raise TPAError(f"train(until={until}): must be between the current step {self.step} and "
                           f"{self.config.steps}")
        start = self._clock()
        while self.step < until:
            self.train_step()
            every = self.config.eval_every
            if (every and self.step % every == 0) or self.step == until:
                self.train_seconds += self._clock() - start
                self.evaluate()
                start = self._clock()
        self.train_seconds += self._clock() - start
        return self.history

    @torch.no_grad()
    def heldout_loss(self, batch_size: int = 16) -> float:
        """Mean cross-entropy (nats per token) over the fixed held-out windows."""
        self.model.eval()
        inputs, targets = self._heldout
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(0, inputs.shape[0], batch_size):
            x = inputs[i:i + batch_size].to(self.device)
            y = targets[i:i + batch_size].to(self.device)
            with self._autocast():
                out = lm.logits(self.model, x)  # [b, N, V] float32
            total += torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                                                       reduction="sum").double()
        self.model.train()
        return float(total) / targets.numel()

    def evaluate(self) -> EvalPoint:
        """Record the held-out loss now (and the mean training loss since the last point)."""
        nats = self.heldout_loss()
        _, targets = self._heldout
        bytes_per_token = float((targets < BYTE_VOCAB).double().mean())  # EOT tokens stand for no byte
        train_loss = float(self._loss_sum) / self._loss_count if self._loss_count else None
        if not math.isfinite(nats) or (train_loss is not None and not math.isfinite(train_loss)):
            raise TPAError(f"{self.variant.name} diverged by step {self.step}: held-out loss {nats}, "
                           f"training loss {train_loss}; lower the learning rate")
        self._loss_sum.zero_()
        self._loss_count = 0
        point = EvalPoint(step=self.step, heldout_loss=nats, bits_per_byte=lm.bits_per_byte(nats, bytes_per_token),
                          train_loss=train_loss, elapsed_s=round(self.train_seconds, 3))
        if self.history.points and self.history.points[-1].step == self.step:
            self.history.points[-1] = point
        else:
            self.history.points.append(point)
        logger.info("%s step %d: held-out %.4f nats/token (%.4f bits/byte), train %s", self.variant.name,
                    self.step, nats, point.bits_per_byte, "-" if train_loss is None else f"{train_loss:.4f}")
        return point

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ----- checkpoints -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write a resumable checkpoint (atomically): parameters, optimizer state, step, history."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": CHECKPOINT_FORMAT,
            "variant": self.variant.name,
            "model_config": dataclasses.asdict(self.variant.config),
            "train_config": dataclasses.asdict(self.config),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "history": self.history.to_list(),
            "loss_sum": float(self._loss_sum), "loss_count": self._loss_count,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    @classmethod
    def resume(cls, path: str | Path, variant: Variant, data: TokenData, config: TrainConfig,
               device: str | torch.device = "cpu") -> Trainer:
        """A trainer continuing the checkpoint at `path`, which must be of this variant and configuration."""
        try:
            # weights_only: a checkpoint is data, never code to run.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            raise TPAError(f"{path} is not a readable training checkpoint ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise TPAError(f"{path} is not a training checkpoint of format {CHECKPOINT_FORMAT}")
        expected = {"variant": variant.name, "model_config": dataclasses.asdict(variant.config),
                    "train_config": dataclasses.asdict(config)}
        for key, value in expected.items():
            if _jsonable(state.get(key)) != _jsonable(value):
                raise TPAError(f"{path} was written for another run: its {key} differs from this one's")
        trainer = cls(variant, data, config, device)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.step = int(state["step"])
        trainer.train_seconds = float(state["train_seconds"])
        trainer.history = History([EvalPoint(**p) for p in state["history"]])
        trainer._loss_sum.fill_(state["loss_sum"])
        trainer._loss_count = int(state["loss_count"])
        return trainer


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (and the embedding), none on norm weights and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _jsonable(value: Any) -> Any:
    """Tuples as lists, so a config read back from a checkpoint compares equal to the live one."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
