"""Save a trained contextual or KV-only `TPAModel` as an official T6 checkpoint folder, which `load_model` reads.

    folder/config.json           the official GPTConfig keys (model_type "gpt2", n_layer, n_head, rank, q_rank...)
    folder/pytorch_model.bin     torch.save of the official parameter names (wte and lm_head tied)
    folder/tokenizer.json, tokenizer_config.json, generation_config.json   (when a tokenizer is given)
    folder/training.json         what the model was trained on and how (optional, for people)

Only a model built as a T6 model can be saved this way (T6 blocks: RMSNorm without weights, SwiGLU of width
floor(8d/3), RoPE base 10000 in the T6 convention with bf16 tables, tied embedding, K and V of equal rank):
`tpa_core.training.variants.tpa_config` builds exactly those, so the loaded model computes the trained one's
logits bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tpa_core.config import TPAConfig
from tpa_core.convert import T6_LAYER_NAMES
from tpa_core.errors import TPAError

_OFFICIAL_NAMES = {ours: official for official, ours in T6_LAYER_NAMES.items()}


def check_t6_compatible(config: TPAConfig) -> None:
    """Raise a TPAError naming the first setting a T6 checkpoint cannot express."""
    expected = {
        "form in (contextual, kv_only)": config.form in ("contextual", "kv_only"),
        "k_rank == v_rank": config.k_rank == config.v_rank,
        "norm_has_weight is False": not config.norm_has_weight,
        "norm_eps is None": config.norm_eps is None,
        "rope_style == 't6'": config.rope_style == "t6",
        "rope_theta == 10000": config.rope_theta == 10000.0,
        "rope_scaling is None": config.rope_scaling is None,
        "rope_tables_bf16 is True": config.rope_tables_bf16,
        "tie_embeddings is True": config.tie_embeddings,
        "qkv_bias is False": not config.qkv_bias,
        "mlp_hidden == floor(8 d / 3)": config.mlp_hidden == math.floor(8 / 3 * config.d_model),
    }
    for rule, holds in expected.items():
        if not holds:
            raise TPAError(f"this model cannot be saved as a T6 checkpoint: it needs {rule} "
                           f"(build it with tpa_core.training.variants.tpa_config)")


def t6_config_json(config: TPAConfig) -> dict[str, Any]:
    """The official config.json for `config` (the keys GPTConfig.save_pretrained writes)."""
    return {"model_type": "gpt2", "architectures": ["GPT"], "vocab_size": config.vocab_size,
            "n_layer": config.n_layers, "n_head": config.n_heads, "head_dim": config.head_dim,
            "n_embd": config.d_model, "rank": config.k_rank, "q_rank": config.q_rank,
            "block_size": config.max_position_embeddings, "bias": False, "dropout": 0.0, "using_groupnorm": False}


def t6_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the official names (float32, CPU; `lm_head.weight` is `transformer.wte.weight`)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        if name == "embed.weight":
            out["transformer.wte.weight"] = tensor
            out["lm_head.weight"] = tensor
            continue
        parts = name.split(".")  # layers.{i}.attn.w_aq
        official = _OFFICIAL_NAMES.get(".".join(parts[2:])) if parts[0] == "layers" else None
        if official is None:
            raise TPAError(f"no T6 name for the weight {name!r}")
        out[f"transformer.h.{parts[1]}.{official}"] = tensor
    return out


def save_t6_checkpoint(model: torch.nn.Module, folder: str | Path, tokenizer: Any = None,
                       training: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write `model` (a T6-shaped `TPAModel`) and its tokenizer into `folder`; returns the folder.

    The folder is written next to its final place and renamed into it, so a reader never sees half a checkpoint.
    An existing non-empty folder is replaced only with `overwrite`.
    """
    config: TPAConfig = model.config
    check_t6_compatible(config)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise TPAError(f"{folder} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(t6_config_json(config), indent=2), encoding="utf-8")
        torch.save(t6_state_dict(model), tmp / "pytorch_model.bin")
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.backend.to_str(), encoding="utf-8")
            tokenizer_config = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                                "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
                                "chat_template": tokenizer.chat_template}
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
            (tmp / "generation_config.json").write_text(
                json.dumps({"eos_token_id": list(tokenizer.eos_token_ids)}, indent=2), encoding="utf-8")
        if training is not None:
            (tmp / "training.json").write_text(json.dumps(training, indent=1), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
