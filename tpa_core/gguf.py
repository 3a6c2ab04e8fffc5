"""Reading GGUF files: metadata, tensors (dequantized to float32) and a Hugging Face view of a Llama-family model.

A GGUF written by llama.cpp's converter differs from the Hugging Face checkpoint it came from in two ways that
matter here:

1. Tensor names follow llama.cpp (`blk.{i}.attn_q.weight`), mapped back with `HF_NAMES` below.
2. For the `llama` architecture the converter permutes the rows of `attn_q` / `attn_k` (weights and biases) per
   head from HF's rotate_half layout (pairs (j, j + D/2)) to llama.cpp's interleaved layout (pairs (2j, 2j + 1)):
   rows `[H, 2, D/2]` are stored as `[H, D/2, 2]`, with H = KV heads for `attn_k`. `unpermute_rows` undoes it,
   exactly as transformers' GGUF loader does, so a GGUF runs through the same rotate_half RoPE as HF weights.
   `qwen2` files are not permuted (llama.cpp's Qwen2 converter writes the rows as they are).

The file is memory-mapped (`tpa_core.gguf_container`); tensors are dequantized one at a time with `gguf.dequantize`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpa_core.errors import TPAError

logger = logging.getLogger(__name__)

# GGUF architectures whose weights run as a Llama-family HF model, and the HF model_type they map to.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Architectures whose attn_q / attn_k rows llama.cpp permuted for its interleaved RoPE.
PERMUTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor name -> HF name ({i} = layer index).
HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def unpermute_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation.

    weight: `[n_heads * D, ...]` (a weight `[n_heads * D, d]` or a bias `[n_heads * D]`) in llama.cpp's
    interleaved layout; returns the same shape in HF's rotate_half layout.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise TPAError(f"cannot un-permute a Q/K tensor of {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    w = weight.reshape(n_heads, half, 2, *weight.shape[1:])  # [H, D/2, 2, ...] as llama.cpp stored it
    return w.transpose(1, 2).reshape(weight.shape)  # [H, 2, D/2, ...] -> [H*D, ...]


def permute_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's permutation (the inverse of `unpermute_rows`); used by tests to write GGUF files."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    w = weight.reshape(n_heads, 2, half, *weight.shape[1:])  # [H, 2, D/2, ...] in HF's layout
    return w.transpose(1, 2).reshape(weight.shape)  # [H, D/2, 2, ...] -> [H*D, ...]


def hf_name(gguf_name: str) -> str | None:
    """HF parameter name of a llama.cpp tensor name (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`);
    None for tensors the HF model does not have (e.g. `rope_freqs.weight`)."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    match = _BLOCK_RE.match(base)
    if match:
        key = "blk.{i}." + match.group(2)
        target = HF_NAMES.get(key)
        return None if target is None else target.format(i=int(match.group(1))) + "." + suffix
    target = HF_NAMES.get(base)
    return None if target is None else f"{target}.{suffix}"


class GGUFFile:
    """A GGUF file opened for reading (memory-mapped; `tpa_core.gguf_container`).

    `metadata` maps every key to its Python value (str, int, float, bool or list), decoded on first use;
    `tensor(name)` returns a float32 tensor in PyTorch's row-major shape (`[rows, cols]` for a matrix: GGUF lists
    dims innermost first); `raw(name)` the stored bytes.
    """

    def __init__(self, path: str | Path, *, writable_map: bool = False) -> None:
        """writable_map: map the file copy-on-write, so that `raw` tensors are writable views (torch warns on
        read-only ones); nothing is ever written back to the file."""
        from tpa_core.gguf_container import GGUFContainer

        self.path = Path(path)
        if not self.path.is_file():
            raise TPAError(f"GGUF file not found: {self.path}")
        self._container = GGUFContainer(self.path, writable=writable_map)
        self._tensors = self._container.tensors
        self._metadata: dict[str, Any] | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        """Every metadata key and its value (decodes all of them, vocabularies included, on first use)."""
        if self._metadata is None:
            self._metadata = {key: self._container.value(key) for key in self._container.key_names()}
        return self._metadata

    # ----- raw access --------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self._container.value("general.architecture")
        if not isinstance(arch, str):
            raise TPAError(f"{self.path}: GGUF metadata lacks general.architecture")
        return arch

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_type(self, name: str) -> str:
        """The GGML storage type of a tensor (`"Q4_1"`, `"F32"`...)."""
        from tpa_core.ggml_types import GGML_TYPES

        return GGML_TYPES[self._get(name).type_id].name

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's PyTorch shape (`[rows, cols]` for a matrix)."""
        return self._get(name).shape

    def nbytes(self, name: str) -> int:
        """A tensor's size in the file."""
        return self._get(name).n_bytes

    def raw(self, name: str) -> torch.Tensor:
        """A tensor's bytes as stored, `[rows, row_bytes]` uint8 (rows: all dims but the innermost), viewing the
        mapped file (no copy)."""
        info = self._get(name)
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        return torch.from_numpy(self._container.data(info).reshape(rows, -1))

    def release(self, name: str) -> None:
        """Drop tensor `name`'s mapped pages from the process's resident memory once it has been copied (its `raw`
        views read the file again if used)."""
        self._container.release(self._get(name))

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` dequantized to float32, shape `[rows, cols]` (or `[n]`)."""
        info = self._get(name)
        if info.type_id == 0:  # F32 (norm weights, biases): read as is, without importing gguf's dequantizers
            values = np.frombuffer(self._container.data(info), dtype="<f4")
            return torch.from_numpy(values.astype(np.float32).reshape(info.shape))
        from gguf import dequantize
        from gguf.constants import GGMLQuantizationType

        qtype = GGMLQuantizationType(info.type_id)
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        try:
            array = dequantize(self._container.data(info).reshape(rows, -1), qtype)
        except NotImplementedError:
            raise TPAError(f"{self.path}: tensor {name} has the GGML type {qtype.name}, "
                           f"which the gguf package cannot dequantize") from None
        except Exception as exc:  # noqa: BLE001 - gguf's numpy code raises anything on malformed blocks
            raise TPAError(f"{self.path}: tensor {name} could not be read ({type(exc).__name__}: {exc}); "
                           f"the file looks damaged") from None
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.size != int(np.prod(info.shape, dtype=np.int64)):
            raise TPAError(f"{self.path}: tensor {name} has {array.size} values, expected shape {info.shape}")
        return torch.from_numpy(array.reshape(info.shape).copy())

    def _get(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise TPAError(f"{self.path}: no tensor named {name!r} in the GGUF file") from None

    def _meta(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        value = self._container.value(key)
        if value is not None:
            return value
        if required:
            raise TPAError(f"{self.path}: GGUF metadata lacks {key}")
        return default

    # ----- the Hugging Face view ---------------------------------------------------------------------------
    def check_supported(self) -> str:
        """The HF model_type this file runs as; TPAError for architectures the engine does not run."""
        arch = self.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise TPAError(f"unsupported architecture in {self.path.name}: GGUF general.architecture={arch!r}; "
                           f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if "rope_freqs.weight" in self._tensors:
            raise TPAError(f"unsupported GGUF {self.path.name}: it carries a rope_freqs tensor (Llama 3.1-style "
                           f"RoPE scaling baked into the file); load the model's Hugging Face folder instead")
        return SUPPORTED_ARCHITECTURES[arch]

    def hf_config(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict for this model, from the GGUF metadata (as transformers derives it)."""
        model_type = self.check_supported()
        arch = self.architecture
        p = f"{arch}."
        n_heads = int(self._meta(p + "attention.head_count", required=True))
        d_model = int(self._meta(p + "embedding_length", required=True))
        tokens = self._meta("tokenizer.ggml.tokens")
        vocab = self._meta(p + "vocab_size")
        if vocab is None:
            if tokens is None:
                raise TPAError(f"{self.path}: GGUF metadata has neither {p}vocab_size nor tokenizer.ggml.tokens")
            vocab = len(tokens)
        head_dim = self._meta(p + "attention.key_length") or self._meta(p + "rope.dimension_count")
        config: dict[str, Any] = {
            "model_type": model_type,
            "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]],
            "hidden_size": d_model,
            "intermediate_size": int(self._meta(p + "feed_forward_length", required=True)),
            "num_hidden_layers": int(self._meta(p + "block_count", required=True)),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(self._meta(p + "attention.head_count_kv", n_heads)),
            "head_dim": int(head_dim) if head_dim else d_model // n_heads,
            "rms_norm_eps": float(self._meta(p + "attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._meta(p + "rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._meta(p + "context_length", 2048)),
            "vocab_size": int(vocab),
            "hidden_act": "silu",
            "tie_word_embeddings": "output.weight" not in self._tensors,
        }
        scaling_type = self._meta(p + "rope.scaling.type")
        if scaling_type not in (None, "none"):
            factor = self._meta(p + "rope.scaling.factor")
            if scaling_type != "linear" or factor is None:
                raise TPAError(f"unsupported GGUF rope scaling {scaling_type!r} in {self.path.name}")
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
        for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
            value = self._meta(f"tokenizer.ggml.{name}")
            if value is not None:
                config[key] = int(value)
        return config

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """All weights under their HF names, float32, Q/K rows un-permuted for the `llama` architecture."""
        config = self.hf_config()
        n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
        permuted = self.architecture in PERMUTED_ARCHITECTURES
        out: dict[str, torch.Tensor] = {}
        for name in self._tensors:
            target = hf_name(name)
            if target is None:
                logger.info("ignoring GGUF tensor %s (no Hugging Face counterpart)", name)
                continue
            weight = self.tensor(name)
            if permuted and ".attn_q." in name:
                weight = unpermute_rows(weight, n_heads)
            elif permuted and ".attn_k." in name:
                weight = unpermute_rows(weight, n_kv)
            out[target] = weight
        if "model.embed_tokens.weight" not in out:
            raise TPAError(f"{self.path}: GGUF file has no token_embd.weight tensor")
        return out
