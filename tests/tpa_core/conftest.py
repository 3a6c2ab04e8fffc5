"""Fixtures for the engine tests: tiny configs of every attention form and an independent reference forward.

The reference (`oracle_logits`) is written from the paper's equations (docs/kernels.md, "The math") in float64: it
materializes Q, K, V per head from the factors (fixed head factors as the paper's a_j = G mask_j vectors),
applies RoPE with explicit cos/sin pair rotations and runs a masked softmax. It shares nothing with
tpa_core but the config and the state-dict names of docs/interfaces.md.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tpa_core.config import TPAConfig
from tpa_core.model import TPAModel

# Tolerances (one table, a reason each).
TOL = {
    "float32_vs_float64": 1e-4,  # float32 model vs float64 oracle, logits of magnitude ~1-10, a few layers
    "hf_parity": 1e-4,  # the acceptance bound: our float32 forward vs transformers' float32 forward
    "float32_paths": 2e-5,  # two float32 code paths of our own (chunked vs one-shot, cached vs full)
}


def tiny_config(form: str, **overrides) -> TPAConfig:
    """A small config of `form` ("contextual", "kv_only", "fixed") with awkward sizes (odd heads, distinct ranks)."""
    base = dict(vocab_size=101, d_model=48, n_layers=2, n_heads=6, head_dim=16, mlp_hidden=80,
                max_position_embeddings=512, rope_theta=10000.0, norm_eps=1e-5)
    if form == "contextual":
        base.update(n_heads=5, q_rank=3, k_rank=2, v_rank=3, contextual_kv=True, rope_style="t6",
                    rope_tables_bf16=True, norm_eps=None, norm_has_weight=False, tie_embeddings=True,
                    mlp_hidden=math.floor(8 / 3 * 48))
    elif form == "kv_only":
        base.update(n_heads=5, q_rank=0, k_rank=2, v_rank=1, contextual_kv=True, rope_style="t6",
                    norm_eps=None, norm_has_weight=False, tie_embeddings=True)
    elif form == "fixed":
        base.update(q_rank=0, k_rank=2, v_rank=2, contextual_kv=False, qkv_bias=True)
    else:
        raise ValueError(form)
    base.update(overrides)
    return TPAConfig(**base)


def random_model(config: TPAConfig, seed: int = 0) -> TPAModel:
    """A TPAModel with weights large enough that attention patterns and norms matter (not the 0.02 init)."""
    torch.manual_seed(seed)
    model = TPAModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.normal_(0, 0.3)
            else:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
    return model.eval()


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    out = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return out if weight is None else out * weight.double()


def oracle_rope(x: torch.Tensor, positions: torch.Tensor, config: TPAConfig) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x `[B, N, K, D]` at `positions` `[B, N]` (no scaling; float64)."""
    D = x.shape[-1]
    half = D // 2
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    angles = positions[..., None].float() * inv  # float32 angles, as both reference implementations do
    c, s = angles.cos(), angles.sin()
    if config.rope_tables_bf16:
        c, s = c.bfloat16(), s.bfloat16()
    c, s = c.double()[:, :, None, :], s.double()[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    if config.rope_style == "rotate_half":  # rotation by +theta
        y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    else:  # T6: rotation by -theta
        y1, y2 = x1 * c + x2 * s, -x1 * s + x2 * c
    return torch.cat([y1, y2], dim=-1)


def oracle_attention(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, q_pos: torch.Tensor,
                     k_len: torch.Tensor) -> torch.Tensor:
    """Softmax attention on materialized heads: Q `[B, N, H, D]`, K/V `[B, T, H, D]`, query positions `[B, N]`,
    valid keys `[B]`; key t is visible to a query at position p when t <= p and t < k_len."""
    D = Q.shape[-1]
    scores = torch.einsum("bnhd,bthd->bhnt", Q, K) / math.sqrt(D)
    t = torch.arange(K.shape[1])
    visible = (t[None, None, :] <= q_pos[:, :, None]) & (t[None, None, :] < k_len[:, None, None])  # [B, N, T]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("bhnt,bthd->bnhd", torch.softmax(scores, dim=-1), V)


def oracle_qkv(sd: dict, prefix: str, h: torch.Tensor, positions: torch.Tensor, config: TPAConfig):
    """Materialized Q, K, V `[B, N, H, D]` of one layer from its state dict (paper equations, float64)."""
    c = config
    B, N, _ = h.shape
    H, D = c.n_heads, c.head_dim

    def proj(name: str, bias: str | None = None) -> torch.Tensor:
        out = h @ sd[prefix + name].double().T
        if bias is not None and prefix + bias in sd:
            out = out + sd[prefix + bias].double()
        return out

    if c.q_rank > 0:
        aq = proj("w_aq").view(B, N, H, c.q_rank)
        bq = oracle_rope(proj("w_bq").view(B, N, c.q_rank, D), positions, c)
        Q = torch.einsum("bnhr,bnrd->bnhd", aq, bq) / c.q_rank
    else:
        Q = oracle_rope(proj("w_q", "b_q").view(B, N, H, D), positions, c)
    bk = oracle_rope(proj("w_bk", "b_bk").view(B, N, c.k_rank, D), positions, c)
    bv = proj("w_bv", "b_bv").view(B, N, c.v_rank, D)
    if c.contextual_kv:
        ak = proj("w_ak").view(B, N, H, c.k_rank)
        av = proj("w_av").view(B, N, H, c.v_rank)
    else:  # fixed head factors: a_j = G mask_j (head h belongs to group h // (H / G))
        G = c.k_rank
        group = torch.arange(H) // (H // G)
        a = G * (group[:, None] == torch.arange(G)[None, :]).double()  # [H, G]
        ak = av = a.expand(B, N, H, G)
    K = torch.einsum("bnhr,bnrd->bnhd", ak, bk) / c.k_rank
    V = torch.einsum("bnhr,bnrd->bnhd", av, bv) / c.v_rank
    return Q, K, V


def oracle_logits(model: TPAModel, tokens: torch.Tensor) -> torch.Tensor:
    """Full causal forward of `model`'s weights from the paper's equations: tokens `[B, N]` -> `[B, N, V]` float64."""
    c = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    B, N = tokens.shape
    positions = torch.arange(N)[None].expand(B, N)
    x = sd["embed.weight"].double()[tokens]
    for i in range(c.n_layers):
        p = f"layers.{i}."
        h = _rms(x, sd.get(p + "attn_norm.weight"), c.norm_eps)
        Q, K, V = oracle_qkv(sd, p + "attn.", h, positions, c)
        out = oracle_attention(Q, K, V, positions, torch.full((B,), N))
        x = x + out.reshape(B, N, -1) @ sd[p + "attn.w_o"].double().T
        h = _rms(x, sd.get(p + "mlp_norm.weight"), c.norm_eps)
        gate, up = h @ sd[p + "mlp.w_gate"].double().T, h @ sd[p + "mlp.w_up"].double().T
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.w_down"].double().T
    x = _rms(x, sd.get("norm.weight"), c.norm_eps)
    head = sd["embed.weight"] if c.tie_embeddings else sd["lm_head.weight"]
    return x @ head.double().T


@pytest.fixture(params=["contextual", "kv_only", "fixed"])
def form(request) -> str:
    return request.param


@pytest.fixture
def helpers() -> SimpleNamespace:
    """The helpers above, for test modules (importing a conftest is fragile): tiny_config, random_model,
    oracle_logits, oracle_qkv, oracle_attention, oracle_rope, TOL."""
    return SimpleNamespace(tiny_config=tiny_config, random_model=random_model, oracle_logits=oracle_logits,
                           oracle_qkv=oracle_qkv, oracle_attention=oracle_attention, oracle_rope=oracle_rope,
                           TOL=TOL)
