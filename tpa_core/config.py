"""`TPAConfig`: the shape of a TPA model, and its construction from Hugging Face and T6 config.json files.

One dataclass describes all three attention forms the engine runs:

- contextual (T6): `q_rank > 0`, `contextual_kv=True`: Q, K, V all factorized with per-token head factors;
- KV-only (T6 KV-only): `q_rank == 0`, `contextual_kv=True`: an ordinary query projection, K and V factorized;
- fixed head factors (converted MHA/GQA/MQA checkpoints): `q_rank == 0`, `contextual_kv=False`,
  `k_rank == v_rank == G` (the number of KV heads, dividing `n_heads`). The head factors are constants
  (`a_j = G mask_j`), so only the B factors (the ordinary K/V heads) are computed and cached.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from tpa_core.errors import TPAError

logger = logging.getLogger(__name__)

ROPE_STYLES = ("rotate_half", "t6")
# Required keys of each supported `rope_scaling` type (besides `rope_type` itself).
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor",),
}
# Scalings that need the pre-training context length; it defaults to max_position_embeddings (as in transformers).
ROPE_SCALING_WITH_ORIGINAL = ("dynamic", "llama3", "yarn")
HF_ARCHITECTURES = ("llama", "qwen2", "mistral")
# The paper's T6 sizes: name -> (layers, d_model, heads, heads of the KV-only variant);
# all with head_dim 64, q_rank 6, rank 2 and a 1024-token context.
T6_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "t6-124m": (12, 768, 34, 22),
    "t6-353m": (24, 1024, 47, 29),
    "t6-773m": (36, 1280, 61, 37),
    "t6-1.5b": (48, 1600, 78, 47),
}


@dataclass
class TPAConfig:
    """Hyper-parameters of a TPA decoder.

    Dimension letters: H = `n_heads`, D = `head_dim`, R_Q/R_K/R_V = `q_rank`/`k_rank`/`v_rank`, d = `d_model`,
    F = `mlp_hidden`, V = `vocab_size`.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    head_dim: int
    k_rank: int
    v_rank: int
    mlp_hidden: int
    q_rank: int = 0  # 0 = full query projection (KV-only and fixed forms)
    contextual_kv: bool = True  # False = fixed head factors (MHA/GQA/MQA): k_rank = v_rank = KV heads
    qkv_bias: bool = False  # biases on the query and the K/V token factors (Qwen2)
    norm_eps: float | None = 1e-6  # None = torch's default for F.rms_norm (the dtype's machine epsilon; T6)
    norm_has_weight: bool = True  # False for T6 (RMSNorm without a learnable weight)
    rope_theta: float = 10000.0
    rope_style: str = "rotate_half"  # "rotate_half" (HF) | "t6" (half-split rotation by -theta)
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"dynamic"|"llama3"|"yarn", ...}
    rope_tables_bf16: bool = False  # round cos/sin tables to bfloat16 as the official T6 code does
    max_position_embeddings: int = 2048
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    arch: str = "tpa"  # where the config came from: "llama", "qwen2", "mistral", "t6", "tpa"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "k_rank", "v_rank",
                     "mlp_hidden", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TPAError(f"TPAConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.q_rank, bool) or not isinstance(self.q_rank, int) or self.q_rank < 0:
            raise TPAError(f"TPAConfig.q_rank must be an integer >= 0 (0 = full query), got {self.q_rank!r}")
        if self.head_dim % 2:
            raise TPAError(f"TPAConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.contextual_kv:
            if self.q_rank != 0:
                raise TPAError(f"TPAConfig.q_rank must be 0 with fixed head factors, got {self.q_rank}")
            if self.k_rank != self.v_rank:
                raise TPAError(f"TPAConfig.v_rank must equal k_rank (the KV heads) with fixed head factors, "
                               f"got k_rank={self.k_rank}, v_rank={self.v_rank}")
            if self.n_heads % self.k_rank:
                raise TPAError(f"TPAConfig.k_rank (KV heads, {self.k_rank}) must divide n_heads ({self.n_heads})")
        if self.qkv_bias and self.q_rank > 0:
            raise TPAError("TPAConfig.qkv_bias needs a full query projection (q_rank = 0); "
                           "contextual query factors have no biases")
        if self.norm_eps is not None and not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise TPAError(f"TPAConfig.norm_eps must be positive or None, got {self.norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise TPAError(f"TPAConfig.rope_theta must be positive, got {self.rope_theta!r}")
        self.rope_theta = float(self.rope_theta)
        if self.rope_style not in ROPE_STYLES:
            raise TPAError(f"TPAConfig.rope_style must be one of {ROPE_STYLES}, got {self.rope_style!r}")
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        if self.rope_scaling is not None and self.rope_scaling["rope_type"] in ROPE_SCALING_WITH_ORIGINAL:
            self.rope_scaling.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        for name in ("bos_token_id",):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise TPAError(f"TPAConfig.{name} must be a token id >= 0 or None, got {value!r}")

    # ----- derived -----------------------------------------------------------------------------------------
    @property
    def form(self) -> str:
        """'contextual' (Q, K, V factorized), 'kv_only' (full Q, contextual K/V) or 'fixed' (MHA/GQA/MQA)."""
        if not self.contextual_kv:
            return "fixed"
        return "contextual" if self.q_rank > 0 else "kv_only"

    @property
    def n_kv_heads(self) -> int:
        """Number of K/V heads with fixed head factors (= k_rank); n_heads for contextual K/V."""
        return self.k_rank if not self.contextual_kv else self.n_heads

    @property
    def q_dim(self) -> int:
        """H * D: width of the attention output fed to `w_o`."""
        return self.n_heads * self.head_dim

    def cache_bytes_per_token(self, element_size: int = 2) -> int:
        """Bytes of factor cache per token over all layers (the paper's formula; A factors only if contextual)."""
        per_layer = (self.k_rank + self.v_rank) * self.head_dim
        if self.contextual_kv:
            per_layer += (self.k_rank + self.v_rank) * self.n_heads
        return per_layer * self.n_layers * element_size

    # ----- persistence -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict; `TPAConfig.from_dict(c.to_dict()) == c`."""
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TPAConfig:
        """Inverse of `to_dict`; unknown keys are an error (a config from a newer or foreign format)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TPAError(f"unknown TPAConfig field(s): {', '.join(unknown)}")
        kwargs = dict(data)
        if "eos_token_ids" in kwargs and kwargs["eos_token_ids"] is not None:
            kwargs["eos_token_ids"] = tuple(kwargs["eos_token_ids"])
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a missing required field
            raise TPAError(f"incomplete TPAConfig: {exc}") from None

    # ----- from checkpoint configs -------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> TPAConfig:
        """From a Hugging Face `config.json` dict of a llama / qwen2 / mistral model (fixed head factors).

        MHA/GQA/MQA become TPA with fixed head factors: k_rank = v_rank = num_key_value_heads, q_rank = 0.
        Mistral's sliding window is honoured by capping the context window at it (within the window sliding
        attention equals full attention), so the engine never silently differs from the original.
        """
        model_type = hf.get("model_type")
        if model_type not in HF_ARCHITECTURES:
            archs = hf.get("architectures")
            raise TPAError(f"unsupported architecture: model_type={model_type!r} (architectures={archs!r}); "
                           f"supported: {', '.join(HF_ARCHITECTURES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise TPAError(f"unsupported hidden_act {act!r} in config.json (only 'silu' SwiGLU MLPs)")
        if hf.get("mlp_bias"):
            raise TPAError("unsupported config.json: mlp_bias=true")
        if model_type == "qwen2":
            qkv_bias = True
        else:
            if hf.get("attention_bias"):
                raise TPAError(f"unsupported config.json: attention_bias=true for {model_type} "
                               f"(biases on the output projection are not supported)")
            qkv_bias = False
        try:
            d_model = int(hf["hidden_size"])
            n_heads = int(hf["num_attention_heads"])
            n_layers = int(hf["num_hidden_layers"])
            vocab = int(hf["vocab_size"])
            mlp_hidden = int(hf["intermediate_size"])
        except KeyError as exc:
            raise TPAError(f"config.json lacks the key {exc.args[0]!r}") from None
        n_kv = hf.get("num_key_value_heads") or n_heads
        head_dim = hf.get("head_dim") or d_model // n_heads
        rope_params = hf.get("rope_parameters")
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
            scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        else:
            rope_theta = hf.get("rope_theta", 10000.0)
            scaling = hf.get("rope_scaling")
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise TPAError("unsupported config.json: partial_rotary_factor != 1")
        max_pos = int(hf.get("max_position_embeddings", 2048))
        if isinstance(scaling, dict):
            scaling = dict(scaling)
            rope_type = scaling.get("rope_type", scaling.get("type"))
            if rope_type == "dynamic":
                # transformers' dynamic NTK measures against max_position_embeddings, whatever else is given
                scaling["original_max_position_embeddings"] = max_pos
            elif rope_type in ROPE_SCALING_WITH_ORIGINAL:
                scaling.setdefault("original_max_position_embeddings",
                                   hf.get("original_max_position_embeddings", max_pos))
            original = scaling.get("original_max_position_embeddings", max_pos)
            if rope_type == "dynamic" or (rope_type == "yarn" and max_pos <= original):
                # these scalings stretch the pre-training window by `factor` beyond max_position_embeddings
                max_pos = int(original * float(scaling.get("factor") or 1.0))
        window = hf.get("sliding_window")
        use_window = model_type == "mistral" or (model_type == "qwen2" and hf.get("use_sliding_window"))
        if use_window and window and int(window) < max_pos:
            if model_type == "qwen2":
                raise TPAError("unsupported config.json: qwen2 with use_sliding_window=true")
            logger.info("capping the context window at the sliding window (%d < %d)", window, max_pos)
            max_pos = int(window)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, head_dim=int(head_dim),
            q_rank=0, k_rank=int(n_kv), v_rank=int(n_kv), contextual_kv=False, qkv_bias=qkv_bias,
            mlp_hidden=mlp_hidden, norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm_has_weight=True,
            rope_theta=float(rope_theta), rope_style="rotate_half", rope_scaling=scaling,
            max_position_embeddings=max_pos, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids, arch=model_type,
        )

    @classmethod
    def from_t6_config(cls, t6: dict[str, Any], kv_only: bool | None = None) -> TPAConfig:
        """From the official T6 `config.json` (model_type "gpt2"; keys n_layer, n_head, head_dim, n_embd, rank...).

        The official KV-only config still carries a `q_rank` (its class default), so only the weights tell the
        forms apart: pass `kv_only=True` when the checkpoint has `attn.c_qkv.c_q.weight`. With `kv_only=None`
        a missing or zero `q_rank` means KV-only.
        """
        try:
            n_embd = int(t6["n_embd"])
            n_head = int(t6["n_head"])
            n_layer = int(t6["n_layer"])
            rank = int(t6["rank"])
        except KeyError as exc:
            raise TPAError(f"T6 config.json lacks the key {exc.args[0]!r}") from None
        if t6.get("bias"):
            raise TPAError("unsupported T6 config.json: bias=true (the official model has no biases)")
        if t6.get("using_groupnorm"):
            raise TPAError("unsupported T6 config.json: using_groupnorm=true")
        q_rank = int(t6.get("q_rank") or 0)
        if kv_only is True:
            q_rank = 0
        elif kv_only is False and q_rank == 0:
            raise TPAError("T6 config.json: q_rank is missing or 0 but the weights have contextual query factors")
        return cls(
            vocab_size=int(t6.get("vocab_size", 50304)), d_model=n_embd, n_layers=n_layer, n_heads=n_head,
            head_dim=int(t6.get("head_dim", 64)), q_rank=q_rank, k_rank=rank, v_rank=rank, contextual_kv=True,
            qkv_bias=False, mlp_hidden=math.floor(8 / 3 * n_embd),  # exactly as the official MLP computes it
            norm_eps=None, norm_has_weight=False, rope_theta=10000.0, rope_style="t6", rope_scaling=None,
            rope_tables_bf16=True, max_position_embeddings=int(t6.get("block_size", 1024)), tie_embeddings=True,
            bos_token_id=None, eos_token_ids=(50256,), arch="t6",
        )


    @classmethod
    def t6_preset(cls, name: str, kv_only: bool = False) -> TPAConfig:
        """One of the paper's T6 configurations (`T6_PRESETS`), contextual or KV-only."""
        if name not in T6_PRESETS:
            raise TPAError(f"unknown T6 preset {name!r}; known: {', '.join(T6_PRESETS)}")
        layers, d, heads, kv_heads = T6_PRESETS[name]
        return cls.from_t6_config(dict(vocab_size=50304, n_layer=layers, n_head=kv_heads if kv_only else heads,
                                       head_dim=64, n_embd=d, rank=2, q_rank=6, block_size=1024),
                                  kv_only=kv_only)


def _normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate a HF-style rope_scaling dict; returns a copy with `rope_type` set, or None for no scaling."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TPAError(f"TPAConfig.rope_scaling must be a dict or None, got {type(scaling).__name__}")
    out = dict(scaling)
    rope_type = out.pop("type", None)
    rope_type = out.get("rope_type", rope_type)
    if rope_type in (None, "default"):
        return None
    if rope_type not in ROPE_SCALING_KEYS:
        raise TPAError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(ROPE_SCALING_KEYS)}")
    out["rope_type"] = rope_type
    for key in ROPE_SCALING_KEYS[rope_type]:
        if key not in out:
            raise TPAError(f"TPAConfig.rope_scaling[{key!r}] is required for rope_type {rope_type!r}")
    factor = out["factor"]
    if not isinstance(factor, (int, float)) or factor < 1.0:
        raise TPAError(f"TPAConfig.rope_scaling['factor'] must be >= 1, got {factor!r}")
    return out
