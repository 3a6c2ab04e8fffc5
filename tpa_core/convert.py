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


# ----- official T6 checkpoints -------------------------------------------------------------------------------
# T6 parameter name (under transformer.h.{i}.) -> TPA name (under layers.{i}.)
T6_LAYER_NAMES = {
    "attn.c_qkv.W_A_q.weight": "attn.w_aq",
    "attn.c_qkv.W_B_q.weight": "attn.w_bq",
    "attn.c_qkv.c_q.weight": "attn.w_q",
    "attn.c_qkv.W_A_k.weight": "attn.w_ak",
    "attn.c_qkv.W_B_k.weight": "attn.w_bk",
    "attn.c_qkv.W_A_v.weight": "attn.w_av",
    "attn.c_qkv.W_B_v.weight": "attn.w_bv",
    "attn.c_proj.weight": "attn.w_o",
    "mlp.c_fc1.weight": "mlp.w_gate",  # SwiGLU: silu(c_fc1 x) * c_fc2 x
    "mlp.c_fc2.weight": "mlp.w_up",
    "mlp.c_proj.weight": "mlp.w_down",
}


def t6_to_tpa(state_dict: dict[str, Tensor], config: TPAConfig) -> dict[str, Tensor]:
    """Official T6 checkpoint weights (tensorgi/TPA's format) -> TPA state dict (docs/interfaces.md names).

    The row layouts already agree: W_A_q rows are (head, r) = head*R_Q + r, W_B_q rows (r, j) = r*D + j, exactly
    the engine's `w_aq` / `w_bq`. The embedding is tied to `lm_head` (either key may be the one saved); T6 has no
    norm weights. Unknown keys (e.g. a `subln` of `using_groupnorm`) and wrong shapes are errors, never dropped.
    """
    H, D, d = config.n_heads, config.head_dim, config.d_model
    expected: dict[str, tuple[int, ...]] = {"embed.weight": (config.vocab_size, d)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        if config.q_rank > 0:
            expected[p + "attn.w_aq"] = (H * config.q_rank, d)
            expected[p + "attn.w_bq"] = (config.q_rank * D, d)
        else:
            expected[p + "attn.w_q"] = (H * D, d)
        expected[p + "attn.w_ak"] = (H * config.k_rank, d)
        expected[p + "attn.w_bk"] = (config.k_rank * D, d)
        expected[p + "attn.w_av"] = (H * config.v_rank, d)
        expected[p + "attn.w_bv"] = (config.v_rank * D, d)
        expected[p + "attn.w_o"] = (d, H * D)
        expected[p + "mlp.w_gate"] = (config.mlp_hidden, d)
        expected[p + "mlp.w_up"] = (config.mlp_hidden, d)
        expected[p + "mlp.w_down"] = (d, config.mlp_hidden)

    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if key in ("transformer.wte.weight", "lm_head.weight"):
            out.setdefault("embed.weight", tensor)
            continue
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "transformer" and parts[1] == "h" and parts[2].isdigit():
            target = T6_LAYER_NAMES.get(".".join(parts[3:]))
            if target is not None:
                out[f"layers.{int(parts[2])}.{target}"] = tensor
                continue
        unknown.append(key)
    if unknown:
        raise TPAError(f"unsupported T6 checkpoint: unexpected weights {unknown[:5]}"
                       f"{' ...' if len(unknown) > 5 else ''}")
    if ("transformer.wte.weight" in state_dict and "lm_head.weight" in state_dict
            and not state_dict["transformer.wte.weight"].equal(state_dict["lm_head.weight"])):
        raise TPAError("unsupported T6 checkpoint: transformer.wte.weight and lm_head.weight differ "
                       "(the official model ties them)")
    missing = sorted(set(expected) - set(out))
    if missing:
        raise TPAError(f"T6 checkpoint is incomplete or of another form (KV-only vs TPA): missing "
                       f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = sorted(set(out) - set(expected))
    if extra:
        raise TPAError(f"T6 checkpoint has weights its config.json does not describe: {extra[:5]} "
                       f"(n_layer or the query form disagree)")
    for name, shape in expected.items():
        if tuple(out[name].shape) != shape:
            raise TPAError(f"T6 checkpoint weight for {name} has shape {tuple(out[name].shape)}, "
                           f"config.json implies {shape}")
    return {name: out[name].float().contiguous() for name in expected}
