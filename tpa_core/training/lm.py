"""The differentiable causal-LM forward used in training, for `TPAModel` and `MLAModel` alike.

`TPAModel.forward` is the inference engine (factor cache, kernels, inference mode); training needs plain autograd
through the same parameters. Both models expose `embed`, `layers[i].attn_norm / attn / mlp_norm / mlp`, `norm` and
`lm_head` (None when tied), and their attention modules take `attn(x, positions)`, so one function serves both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpa_core.model import residual_dtype


def logits(model: nn.Module, tokens: Tensor) -> Tensor:
    """Causal next-token logits `[B, N, V]` (float32) for `tokens` `[B, N]` at positions 0..N-1."""
    N = tokens.shape[1]
    positions = torch.arange(N, device=tokens.device)  # [N]
    weight = model.embed.weight
    x = model.embed(tokens).to(residual_dtype(weight.dtype))  # [B, N, d], the residual stream
    for block in model.layers:
        x = x + block.attn(block.attn_norm(x), positions)
        x = x + block.mlp(block.mlp_norm(x))
    head = weight if model.lm_head is None else model.lm_head.weight  # [V, d]
    return F.linear(model.norm(x), head).float()  # [B, N, V]


def loss(model: nn.Module, tokens: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (nats per token) of predicting `targets` `[B, N]` from `tokens` `[B, N]`."""
    out = logits(model, tokens)  # [B, N, V]
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))


def bits_per_byte(nats_per_token: float, bytes_per_token: float = 1.0) -> float:
    """Cross-entropy in bits per byte of text (a byte-level model: one byte per token)."""
    return nats_per_token / math.log(2) / bytes_per_token
