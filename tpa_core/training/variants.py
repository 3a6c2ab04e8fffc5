"""The attention variants of the convergence comparison, built at matched attention parameter counts.

Every variant shares the model around the attention (T6 blocks: RMSNorm without weights, SwiGLU of width
floor(8d/3), RoPE base 10000, tied embedding) and differs only in the attention. The rule follows the paper's
setup: the baseline is MHA with H = d / D heads, whose attention has 4 d^2 parameters per layer; every other
variant keeps its ranks fixed at the paper's values and takes the number of heads whose attention parameters come
closest to that baseline. At the paper's 124M shape (d = 768, D = 64) this gives its GQA (22 heads in 2
groups), MQA (23) and MLA (13) exactly; for TPA and KV-only it gives 33 and 21 heads where the paper took 34 and
22, which sit 2.7% and 2.9% above MHA. A variant that cannot come within `MATCH_TOLERANCE` at a shape is an
error, not a silent mismatch.

| variant | attention | fixed ranks | cache per token and layer |
|---|---|---|---|
| mha | fixed head factors, R = H | - | 2 H D |
| gqa | fixed head factors, 2 KV groups | G = 2 | 2 G D |
| mqa | fixed head factors, 1 KV head | G = 1 | 2 D |
| tpa | contextual Q, K, V | R_Q = 6, R_K = R_V = 2 | (R_K + R_V)(H + D) |
| tpa_kvonly | full Q, contextual K, V | R_K = R_V = 2 | (R_K + R_V)(H + D) |
| mla | DeepSeek-V2 latent | q_lora 2d/3, kv_lora d/3, RoPE D/2 | kv_lora + D/2 |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tpa_core.config import TPAConfig
from tpa_core.errors import TPAError
from tpa_core.training.mla import MLAConfig

VARIANTS = ("mha", "gqa", "mqa", "tpa", "tpa_kvonly", "mla")
MATCH_TOLERANCE = 0.02  # attention parameters within 2% of the MHA baseline's
TPA_Q_RANK, TPA_KV_RANK, GQA_GROUPS = 6, 2, 2
MAX_HEADS = 512


@dataclass(frozen=True)
class ModelShape:
    """What all variants of one comparison share: width d, layers, head dim D, vocabulary, context."""

    d_model: int
    n_layers: int
    head_dim: int
    vocab_size: int
    context: int

    def __post_init__(self) -> None:
        if self.d_model % self.head_dim:
            raise TPAError(f"d_model ({self.d_model}) must be a multiple of head_dim ({self.head_dim}): "
                           f"the MHA baseline has d / D heads")
        if self.head_dim % 4:
            raise TPAError(f"head_dim must be a multiple of 4 (MLA's RoPE part is D/2, even), got {self.head_dim}")

    @property
    def mlp_hidden(self) -> int:
        return math.floor(8 / 3 * self.d_model)  # the T6 MLP width

    @property
    def baseline_attention_params(self) -> int:
        """MHA's attention parameters per layer: Q, K, V, O, each d x d."""
        return 4 * self.d_model * self.d_model


@dataclass(frozen=True)
class Variant:
    """One built variant: its name, config (TPAConfig or MLAConfig) and the counts the comparison reports."""

    name: str
    config: TPAConfig | MLAConfig
    attention_params_per_layer: int
    cache_bytes_per_token: int  # bf16, all layers

    @property
    def n_heads(self) -> int:
        return self.config.n_heads

    @property
    def mismatch(self) -> float:
        """Relative difference of attention parameters from the MHA baseline of the same shape."""
        return self.attention_params_per_layer / self._baseline - 1.0

    @property
    def _baseline(self) -> int:
        return 4 * self.config.d_model * self.config.d_model

    def build(self, device: torch.device | str | None = None) -> nn.Module:
        """A freshly initialized float32 model (initialized from torch's current RNG state)."""
        if isinstance(self.config, MLAConfig):
            from tpa_core.training.mla import MLAModel

            return MLAModel(self.config, device=device)
        from tpa_core.model import TPAModel

        return TPAModel(self.config, device=device)


def tpa_config(shape: ModelShape, form: str, n_heads: int, kv_heads: int | None = None) -> TPAConfig:
    """A TPAConfig with T6 blocks: `form` "contextual" (R_Q = 6, R_K = R_V = 2), "kv_only" (R_K = R_V = 2) or
    "fixed" (MHA / GQA / MQA: k_rank = v_rank = `kv_heads`). RoPE tables are rounded to bf16 as the official
    T6 code does, so a trained contextual or KV-only model is exactly the one its T6 checkpoint loads as."""
    if form == "fixed":
        if kv_heads is None:
            raise TPAError("fixed head factors need kv_heads")
        q_rank, rank = 0, kv_heads
    elif form in ("contextual", "kv_only"):
        q_rank, rank = (TPA_Q_RANK if form == "contextual" else 0), TPA_KV_RANK
    else:
        raise TPAError(f"unknown attention form {form!r}: use contextual, kv_only or fixed")
    return TPAConfig(vocab_size=shape.vocab_size, d_model=shape.d_model, n_layers=shape.n_layers, n_heads=n_heads,
                     head_dim=shape.head_dim, q_rank=q_rank, k_rank=rank, v_rank=rank,
                     contextual_kv=form != "fixed", mlp_hidden=shape.mlp_hidden, norm_eps=None,
                     norm_has_weight=False, rope_style="t6", rope_tables_bf16=True,
                     max_position_embeddings=shape.context, tie_embeddings=True, arch="t6")


def mla_config(shape: ModelShape, n_heads: int) -> MLAConfig:
    """MLA with the paper's proportions: q_lora 2d/3, kv_lora d/3, RoPE part D/2, no-RoPE part and values D."""
    D = shape.head_dim
    return MLAConfig(vocab_size=shape.vocab_size, d_model=shape.d_model, n_layers=shape.n_layers, n_heads=n_heads,
                     q_lora_rank=round(2 * shape.d_model / 3), kv_lora_rank=round(shape.d_model / 3),
                     qk_nope_dim=D, qk_rope_dim=D // 2, v_head_dim=D, mlp_hidden=shape.mlp_hidden,
                     max_position_embeddings=shape.context)


def attention_params(config: TPAConfig | MLAConfig) -> int:
    """Attention parameters of one layer, from the config alone (the tests check it against the modules)."""
    d = config.d_model
    H = config.n_heads
    if isinstance(config, MLAConfig):
        c = config
        q = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * (c.qk_nope_dim + c.qk_rope_dim)
        kv = d * (c.kv_lora_rank + c.qk_rope_dim) + c.kv_lora_rank + c.kv_lora_rank * H * (c.qk_nope_dim
                                                                                              + c.v_head_dim)
        return q + kv + H * c.v_head_dim * d
    D = config.head_dim
    if config.form == "contextual":
        rows = H * config.q_rank + config.q_rank * D
    else:
        rows = H * D
    if config.contextual_kv:
        rows += H * (config.k_rank + config.v_rank)
    rows += (config.k_rank + config.v_rank) * D
    bias = rows if config.qkv_bias else 0  # never set by this module; counted so the formula stays general
    return rows * d + bias + d * H * D


def cache_bytes(config: TPAConfig | MLAConfig) -> int:
    """KV cache bytes per token over all layers in bf16."""
    return config.cache_bytes_per_token(2)


def _config_for(shape: ModelShape, name: str, n_heads: int) -> TPAConfig | MLAConfig:
    if name in ("mha", "gqa", "mqa"):
        return tpa_config(shape, "fixed", n_heads, {"mha": n_heads, "gqa": GQA_GROUPS, "mqa": 1}[name])
    if name == "tpa":
        return tpa_config(shape, "contextual", n_heads)
    if name == "tpa_kvonly":
        return tpa_config(shape, "kv_only", n_heads)
    if name == "mla":
        return mla_config(shape, n_heads)
    raise TPAError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")


def matched_heads(shape: ModelShape, name: str) -> int:
    """The number of heads whose attention parameters come closest to the MHA baseline's (ties: fewer heads)."""
    if name == "mha":
        return shape.d_model // shape.head_dim
    step = GQA_GROUPS if name == "gqa" else 1
    target = shape.baseline_attention_params

    def distance(heads: int) -> tuple[int, int]:
        return abs(attention_params(_config_for(shape, name, heads)) - target), heads

    return min(range(step, MAX_HEADS + 1, step), key=distance)


def build_variant(shape: ModelShape, name: str) -> Variant:
    """The variant `name` at `shape` with matched heads; a mismatch above `MATCH_TOLERANCE` is a TPAError."""
    config = _config_for(shape, name, matched_heads(shape, name))
    variant = Variant(name=name, config=config, attention_params_per_layer=attention_params(config),
                      cache_bytes_per_token=cache_bytes(config))
    if abs(variant.mismatch) > MATCH_TOLERANCE:
        raise TPAError(f"{name} cannot match the MHA baseline's attention parameters within "
                       f"{MATCH_TOLERANCE:.0%} at d={shape.d_model}, D={shape.head_dim} (best: {config.n_heads} "
                       f"heads, {variant.mismatch:+.1%}); pick another d_model / head_dim")
    return variant
