"""Checkpoint weights -> `TPAModel` state dicts (names of docs/interfaces.md).

Llama-family models (llama, qwen2, mistral) are TPA with fixed head factors: the query projection is the full
`w_q`, the K/V projections are the B-factor projections `w_bk`/`w_bv` (rank r = KV head r), and the constant
head factors need no weights at all. The map is literal; nothing is permuted.
"""

from __future__ import annotations

from torch import Tensor

from tpa_core.config import TPAConfig
from tpa_core.errors import TPAError

# HF name (after "model.layers.{i}.") -> TPAModel name (after "layers.{i}.").
_HF_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_proj.weight": "attn.w_q",
    "self_attn.k_proj.weight": "attn.w_bk",
    "self_attn.v_proj.weight": "attn.w_bv",
    "self_attn.o_proj.weight": "attn.w_o",
    "mlp.gate_proj.weight": "mlp.w_gate",
    "mlp.up_proj.weight": "mlp.w_up",
    "mlp.down_proj.weight": "mlp.w_down",
}
_HF_BIAS_MAP = {
    "self_attn.q_proj.bias": "attn.b_q",
    "self_attn.k_proj.bias": "attn.b_bk",
    "self_attn.v_proj.bias": "attn.b_bv",
}


def hf_llama_family_to_tpa(state_dict: dict[str, Tensor], config: TPAConfig) -> dict[str, Tensor]:
    """Map a Hugging Face llama / qwen2 / mistral state dict to TPAModel names (tensors are not copied).

    Args:
        state_dict: HF names (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...).
        config: the model's TPAConfig (fixed head factors; `qkv_bias` for Qwen2; `tie_embeddings`).

    Returns:
        `embed.weight`, `layers.{i}.*`, `norm.weight` and `lm_head.weight` (unless tied).

    Raises:
        TPAError: a weight the config needs is missing, a weight is left over, or a shape does not fit.
    """
    if config.form != "fixed":
        raise TPAError(f"hf_llama_family_to_tpa converts fixed-head-factor configs, got form {config.form!r}")
    src = dict(state_dict)
    out: dict[str, Tensor] = {}

    def take(hf_name: str, name: str, shape: tuple[int, ...]) -> None:
        if hf_name not in src:
            raise TPAError(f"checkpoint lacks the weight {hf_name!r}")
        value = src.pop(hf_name)
        if tuple(value.shape) != shape:
            raise TPAError(f"weight {hf_name!r} has shape {tuple(value.shape)}, the config needs {shape}")
        out[name] = value

    c = config
    d, H, D, G, F = c.d_model, c.n_heads, c.head_dim, c.k_rank, c.mlp_hidden
    layer_shapes = {
        "attn_norm.weight": (d,), "mlp_norm.weight": (d,), "attn.w_q": (H * D, d), "attn.w_bk": (G * D, d),
        "attn.w_bv": (G * D, d), "attn.w_o": (d, H * D), "mlp.w_gate": (F, d), "mlp.w_up": (F, d),
        "mlp.w_down": (d, F), "attn.b_q": (H * D,), "attn.b_bk": (G * D,), "attn.b_bv": (G * D,),
    }
    take("model.embed_tokens.weight", "embed.weight", (c.vocab_size, d))
    for i in range(c.n_layers):
        names = dict(_HF_LAYER_MAP, **(_HF_BIAS_MAP if c.qkv_bias else {}))
        for hf_name, name in names.items():
            take(f"model.layers.{i}.{hf_name}", f"layers.{i}.{name}", layer_shapes[name])
    take("model.norm.weight", "norm.weight", (d,))
    if c.tie_embeddings:
        src.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    else:
        take("lm_head.weight", "lm_head.weight", (c.vocab_size, d))
    leftover = sorted(k for k in src if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise TPAError(f"checkpoint has weights the config does not use: {', '.join(leftover[:5])}"
                       f"{' ...' if len(leftover) > 5 else ''}")
    return out
