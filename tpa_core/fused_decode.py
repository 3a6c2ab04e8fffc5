"""Decode steps of fixed-head-factor (Llama-family) models on the CPU: one compiled call per block.

For one new token a block's modules (two RMSNorms, four projections, RoPE, the cache write, grouped attention,
SwiGLU, two residual adds) make about forty torch calls from Python; on the 135M default model the small calls
took a third of a decode step and SDPA's one-query attention another third (benchmarks/NOTES.md).
`torch.ops.tpa_gguf.decode_block` (tpa_core/csrc/decode_block.cpp) does a whole block in one call. `DecodePlan`
gathers once per model what it needs per layer: the norm weights, and each projection as parts, either float32
matrices or GGUF blocks in the packed layout (`tpa_core.quant`).

The module path stays the reference and runs everything else (prefill, batches, 16-bit models, contextual TPA
forms, CUDA, CPUs or builds without the packed kernel); tests/tpa_core/test_fused_decode.py holds the two paths
equal to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tpa_core.quant import ops
from tpa_core.quant.linear import QuantLinear

if TYPE_CHECKING:
    from tpa_core.attention import StepInfo
    from tpa_core.cache import FactorCache
    from tpa_core.model import TPAModel

F32 = 0  # the GGML type id the op reads as a float32 matrix


@dataclass(frozen=True)
class BlockArgs:
    """One block's arguments to `decode_block`: the norms' weights (None: no weight), every projection's parts in
    the order q|k|v, o, gate|up, down (`parts`: how many each), their GGML types and activation levels, and the
    q|k|v bias (Qwen2)."""

    attn_norm: Tensor | None
    mlp_norm: Tensor | None
    weights: list[Tensor]
    types: list[int]
    levels: list[int]
    parts: list[int]
    bias: Tensor | None


class DecodePlan:
    """Every block's `BlockArgs` for one model, and the step that runs them (`run`)."""

    def __init__(self, blocks: list[BlockArgs], eps: float, heads: int, scale: float) -> None:
        self.blocks, self.eps, self.heads, self.scale = blocks, eps, heads, scale

    def run(self, x: Tensor, cache: FactorCache, step: StepInfo) -> None:
        """x `[1, 1, d]` float32, the residual of one new token of sequence `step.rows`, through every block in
        place; each layer's keys and values are written at the sequence's next position (lengths unchanged, as
        the module path leaves them for `FactorCache.advance`)."""
        residual = x.view(-1)  # [d]
        pos = step.starts[0]
        seq = step.rows.start or 0
        cos, sin = step.rope.cos.reshape(-1), step.rope.sin.reshape(-1)  # [D] each
        keys, values = cache.storage["bk"], cache.storage["bv"]  # [L, B, T_cap, G, D]
        for i, b in enumerate(self.blocks):
            torch.ops.tpa_gguf.decode_block(residual, b.attn_norm, b.mlp_norm, self.eps, b.weights, b.types,
                                            b.levels, b.parts, b.bias, keys[i, seq], values[i, seq], pos, cos, sin,
                                            self.heads, self.scale)


def plan_for(model: TPAModel) -> DecodePlan | None:
    """The model's plan (built on first use, rebuilt when a parameter or a resident matrix changes), or None when
    the model does not qualify: not a float32 CPU model with fixed head factors, a projection the op cannot read,
    a forced attention backend, or no built op on this machine."""
    cached = getattr(model, "_decode_plan", None)
    if cached is not None and cached[0].matches(model):
        return cached[1]
    snapshot = WeightsSnapshot(model)
    plan = _build(model)
    model._decode_plan = (snapshot, plan)
    return plan


def applies(step: StepInfo, tokens: Tensor) -> bool:
    """Whether this forward call is one the plan covers: one new token of one sequence."""
    return tokens.shape == (1, 1) and len(step.starts) == 1


class WeightsSnapshot:
    """Which tensors a model's weights were when a plan was built: every parameter (the object and its version,
    which in-place changes move) and every resident matrix, and the attention backend. Checking costs about 25 us
    for the default model's 182 parameters (walking `model.parameters()` would cost 470 us)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [(module._parameters, name, param) for module in model.modules()
                       for name, param in module._parameters.items() if param is not None]
        self.versions = [param._version for _, _, param in self.params]
        self.resident = [(module.packed, dict(module.packed)) for module in model.modules()
                         if hasattr(module, "packed")]
        self.backend = model.attention_backend

    def matches(self, model: nn.Module) -> bool:
        return (model.attention_backend == self.backend
                and all(params.get(name) is param for params, name, param in self.params)
                and [param._version for _, _, param in self.params] == self.versions
                and all(live == held for live, held in self.resident))  # QuantLinear compares by identity


def _build(model: TPAModel) -> DecodePlan | None:
    config = model.config
    if (model.device.type != "cpu" or model.dtype != torch.float32 or config.contextual_kv
            or model.attention_backend not in ("auto", "torch") or not ops.load_built()):
        return None
    blocks = []
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        projections = [_parts(attn.packed.get("w_in"), attn.w_in), _parts(attn.packed.get("w_o"), attn.w_o),
                       _parts(mlp.packed.get("w_gate_up"), mlp.w_gate_up), _parts(mlp.packed.get("w_down"), mlp.w_down)]
        if any(p is None for p in projections):
            return None
        blocks.append(BlockArgs(
            attn_norm=None if block.attn_norm.weight is None else block.attn_norm.weight.detach(),
            mlp_norm=None if block.mlp_norm.weight is None else block.mlp_norm.weight.detach(),
            weights=[w for p in projections for w, _, _ in p], types=[t for p in projections for _, t, _ in p],
            levels=[lv for p in projections for _, _, lv in p], parts=[len(p) for p in projections],
            bias=None if attn.b_in is None else attn.b_in.detach()))
    eps = config.norm_eps if config.norm_eps is not None else torch.finfo(torch.float32).eps
    return DecodePlan(blocks, float(eps), config.n_heads, config.head_dim ** -0.5)


def _parts(packed: QuantLinear | None, weight: Tensor) -> list[tuple[Tensor, int, int]] | None:
    """A projection as (matrix, GGML type, levels) parts: a resident one's matrices if every one is float32 or
    packed (rows in matrix order), else the float32 parameter itself; None if the op cannot read it."""
    if packed is None:
        return [(weight.detach(), F32, 0)] if weight.is_contiguous() else None
    parts = []
    for matrix in packed.parts:
        if matrix.fmt is None:
            parts.append((matrix.data, F32, 0))
        elif matrix.packed and ops.packs_fast():
            parts.append((matrix.data, matrix.fmt.type_id, matrix.levels))
        else:
            return None
    return parts
