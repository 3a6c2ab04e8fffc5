"""Weight initialization for training: "normal" keeps the modules' own init (normal, std 0.02, everything alike),
"official" re-initializes as the paper's training code does, for every variant alike:

- every projection: PyTorch's `nn.Linear` default, uniform in +-1/sqrt(fan_in) (fan_in = d for the input
  projections); the tied embedding / LM head likewise, as one `nn.Linear(d, V)`;
- the output projections of attention and MLP: zero, so every block starts as the identity;
- TPA's contextual factor projections: Xavier-uniform over the official code's views of the weight, A factors
  over (d, H, R) and B factors over (d, R, D), i.e. bound sqrt(6 / (H R + d R)) and sqrt(6 / (R D + d D)).

Under "normal", TPA's contextual Q = A_Q B_Q / R_Q starts several times smaller than an MHA query of the same
init; "official" is the paper's remedy. Which trains better at a given size is an empirical question: the
convergence benchmark takes `--init`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tpa_core.attention import TPAAttention
from tpa_core.model import SwiGLU
from tpa_core.training.mla import MLAAttention

INIT_SCHEMES = ("official", "normal")


def _uniform(t: Tensor, bound: float) -> None:
    nn.init.uniform_(t, -bound, bound)


def _linear_default(t: Tensor) -> None:
    """nn.Linear's init (kaiming_uniform with a = sqrt(5)): uniform in +-1/sqrt(fan_in), t `[out, in]`."""
    _uniform(t, 1.0 / math.sqrt(t.shape[1]))


def _tpa_attention(attn: TPAAttention) -> None:
    c = attn.config
    d, H, D = c.d_model, c.n_heads, c.head_dim
    ranks = {"aq": c.q_rank, "bq": c.q_rank, "ak": c.k_rank, "bk": c.k_rank, "av": c.v_rank, "bv": c.v_rank}
    offset = 0
    for name, rows in zip(attn.part_names, attn.part_sizes):
        part = attn.w_in[offset:offset + rows]  # [rows, d], a view of the fused weight
        offset += rows
        if name == "q" or attn.form == "fixed":  # an ordinary projection: q_proj, or GQA's k_proj / v_proj
            _linear_default(part)
        elif name.startswith("a"):  # A factor, official view (d, H, R)
            R = ranks[name]
            _uniform(part, math.sqrt(6.0 / (H * R + d * R)))
        else:  # B factor, official view (d, R, D)
            R = ranks[name]
            _uniform(part, math.sqrt(6.0 / (R * D + d * D)))
    if attn.b_in is not None:
        nn.init.zeros_(attn.b_in)
    nn.init.zeros_(attn.w_o)


def _mla_attention(attn: MLAAttention) -> None:
    for weight in (attn.w_qa, attn.w_qb, attn.w_kva, attn.w_kvb):
        _linear_default(weight)
    nn.init.zeros_(attn.w_o)


@torch.no_grad()
def initialize(model: nn.Module, scheme: str = "official") -> None:
    """Re-initialize a `TPAModel` or `MLAModel` in place with `scheme` ("official", or "normal": keep the
    modules' own normal(0, 0.02) init). Uses torch's current RNG state."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; known: {', '.join(INIT_SCHEMES)}")
    if scheme == "normal":
        return
    _linear_default(model.embed.weight)  # [V, d]: the tied head's nn.Linear(d, V) init
    if getattr(model, "lm_head", None) is not None:
        _linear_default(model.lm_head.weight)
    for module in model.modules():
        if isinstance(module, TPAAttention):
            _tpa_attention(module)
        elif isinstance(module, MLAAttention):
            _mla_attention(module)
        elif isinstance(module, SwiGLU):
            _linear_default(module.w_gate_up)
            nn.init.zeros_(module.w_down)
