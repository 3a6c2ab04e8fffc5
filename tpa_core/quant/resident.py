"""A TPAModel whose matrices stay in their GGUF blocks, built straight from the memory-mapped file.

No float32 copy of the model is made: each matrix is either rearranged once into the decode kernel's
row-interleaved layout (`ops.repack`, lossless; its file pages then leave the process's memory) where this CPU has
that kernel, or a view of the mapped file (`QuantMatrix`), whose rows of `attn_q` / `attn_k` that llama.cpp
permuted stay where they are while the product's outputs are reordered instead.
Matrices of types the op does not compute with are dequantized to float32 one at a time, with a log line.
Norm weights and biases are float32. The float32 parameters of the matrices become placeholders (`placeholder`)
and the model computes through `QuantLinear` / `QuantEmbedding`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from tpa_core.errors import TPAError
from tpa_core.quant import ops, packed_store
from tpa_core.quant.formats import CACHE_DTYPE, FORMATS, BlockFormat, activation_levels
from tpa_core.quant.linear import QuantEmbedding, QuantLinear, QuantMatrix, placeholder
from tpa_core.quant.packed_store import PackedStore

if TYPE_CHECKING:
    from tpa_core.config import TPAConfig
    from tpa_core.gguf import GGUFFile

logger = logging.getLogger(__name__)

# The GGUF tensors of a block's projections (`blk.<i>.<role>.weight`).
PROJECTIONS = tuple(f"{role}.weight" for role in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                                   "ffn_down"))


def matrix(gguf: GGUFFile, name: str, heads: int | None = None, levels: int = 2,
           stored: PackedStore | None = None, repacked: list[str] | None = None) -> QuantMatrix:
    """GGUF matrix `name` as a QuantMatrix; `heads`: un-permute llama.cpp's Q/K rows for that many heads;
    `levels`: the decode product's activation levels (`formats.activation_levels`). A matrix that `packs` is taken
    from `stored` when it holds it, else repacked and its name appended to `repacked`."""
    from tpa_core.gguf import PERMUTED_ARCHITECTURES, unpermute_rows

    rows, cols = gguf.shape(name)
    type_name = gguf.tensor_type(name)
    fmt = FORMATS.get(type_name)
    if fmt is not None and cols % fmt.values == 0:
        data = gguf.raw(name)  # [rows, row_bytes], a view of the file
        if data.shape[1] != fmt.row_bytes(cols):
            raise TPAError(f"{gguf.path}: tensor {name} ({type_name} [{rows}, {cols}]) has rows of {data.shape[1]} "
                           f"bytes, expected {fmt.row_bytes(cols)}; the file looks damaged")
    else:
        if type_name != "F32":
            logger.info("%s: %s is %s, which stays resident as float32 (no integer kernel for it)",
                        gguf.path.name, name, type_name)
        fmt, data = None, gguf.tensor(name)  # [rows, cols] float32
    order = None
    if heads is not None and gguf.architecture in PERMUTED_ARCHITECTURES:
        order = unpermute_rows(torch.arange(rows), heads)  # row i of the HF matrix is stored row order[i]
    if fmt is not None and packs(fmt, rows, cols):
        packed = stored.get(name, rows, ops.packed_row_bytes(fmt.type_id, cols)) if stored is not None else None
        if packed is None:
            packed = ops.repack(data, fmt.type_id, cols, order)  # [rows, packed row bytes], rows in matrix order
            gguf.release(name)
            if repacked is not None:
                repacked.append(name)
        return QuantMatrix(packed, fmt, rows, cols, levels=levels, packed=True)
    return QuantMatrix(data, fmt, rows, cols, order, levels)


def packs(fmt: BlockFormat, rows: int, cols: int) -> bool:
    """Whether a matrix is held in the decode kernel's row-interleaved layout (`ops.repack`): its type has one, its
    rows fill whole groups, and this CPU has the kernel for it (AVX-512); else it stays in the file's layout."""
    return (ops.available() and ops.packs_fast() and rows % ops.packed_group() == 0
            and ops.packed_row_bytes(fmt.type_id, cols) > 0)


def resident_row_bytes(fmt: BlockFormat, rows: int, cols: int) -> int:
    """Bytes per row of a resident matrix: the packed layout's where it `packs`, else the file's."""
    return ops.packed_row_bytes(fmt.type_id, cols) if packs(fmt, rows, cols) else fmt.row_bytes(cols)


def resident_nbytes(gguf: GGUFFile) -> int:
    """Bytes the resident model holds: quantized/16-bit matrices as stored, everything else as float32."""
    total = 0
    for name in gguf.tensor_names:
        shape = gguf.shape(name)
        type_name = gguf.tensor_type(name)
        if type_name in FORMATS and len(shape) == 2 and shape[1] % FORMATS[type_name].values == 0:
            total += shape[0] * resident_row_bytes(FORMATS[type_name], *shape)
        else:
            total += 4 * int(torch.Size(shape).numel())
    return total


def dense_prefill_nbytes(gguf: GGUFFile) -> int:
    """Bytes of the float32 copies `build_resident_model(dense_prefill=True)` holds: every block's projections (the
    embedding and the LM head stay in their blocks)."""
    return sum(4 * int(torch.Size(gguf.shape(name)).numel()) for name in gguf.tensor_names
               if name.startswith("blk.") and name.endswith(PROJECTIONS))


def build_resident_model(gguf: GGUFFile, config: TPAConfig, packed_dir: Path | None = None,
                         prefill: torch.dtype = torch.float32, dense_prefill: bool = False):
    """A TPAModel (eval mode, CPU, float32 compute, its cache in `formats.CACHE_DTYPE`) running `gguf`'s matrices
    in their blocks. `packed_dir`: the model's cache folder, where the packed matrices are kept (`packed_store`) and
    read back on the next load; `prefill`: the dtype of its prefill GEMMs (`formats.prefill_dtype`);
    `dense_prefill`: every block's projections also held in float32 for prefill (`QuantLinear.keep_dense`; decode
    still computes with the blocks)."""
    from tpa_core.loading import skip_init
    from tpa_core.model import TPAModel

    if config.form != "fixed":
        raise TPAError(f"resident GGUF weights need a fixed-head-factor model, not form {config.form!r}")
    with skip_init():
        model = TPAModel(config, device="meta", dtype=torch.float32)
    names = set(gguf.tensor_names)
    levels = activation_levels(gguf.path.stat().st_size)
    stored = PackedStore.open(packed_dir) if packed_dir is not None else None
    repacked: list[str] = []  # matrices this load had to repack: the store is written again
    built: dict[str, QuantMatrix] = {}

    def need(name: str) -> str:
        if name not in names:
            raise TPAError(f"{gguf.path}: GGUF file has no tensor {name}; it is not a complete "
                           f"{gguf.architecture} model")
        return name

    def resident(name: str, heads: int | None = None) -> QuantMatrix:
        built[name] = matrix(gguf, need(name), heads, levels, stored, repacked)
        return built[name]

    def vector(name: str, size: int) -> nn.Parameter:
        value = gguf.tensor(need(name)).reshape(-1)
        if value.numel() != size:
            raise TPAError(f"{gguf.path}: {name} has {value.numel()} values, the config needs {size}")
        return nn.Parameter(value, requires_grad=False)

    def linear(parts: list[QuantMatrix], rows: int, cols: int, label: str, dense: bool = dense_prefill) -> QuantLinear:
        layer = QuantLinear(parts, prefill)
        if (layer.out_features, layer.in_features) != (rows, cols):
            raise TPAError(f"{gguf.path}: {label} is [{layer.out_features}, {layer.in_features}], the config needs "
                           f"[{rows}, {cols}]")
        if dense:
            layer.keep_dense()
        return layer

    c = config
    for i, block in enumerate(model.layers):
        p = f"blk.{i}."
        attn, mlp = block.attn, block.mlp
        block.attn_norm.weight = vector(p + "attn_norm.weight", c.d_model)
        block.mlp_norm.weight = vector(p + "ffn_norm.weight", c.d_model)
        q, k, v = resident(p + "attn_q.weight", c.n_heads), resident(p + "attn_k.weight", c.k_rank), \
            resident(p + "attn_v.weight")
        attn.packed["w_in"] = linear([q, k, v], *attn.w_in.shape, f"layer {i} attn_q|attn_k|attn_v")
        attn.packed["w_o"] = linear([resident(p + "attn_output.weight")], *attn.w_o.shape, f"layer {i} attn_output")
        if attn.b_in is not None:
            from tpa_core.gguf import PERMUTED_ARCHITECTURES, unpermute_rows

            biases = [gguf.tensor(need(p + f"attn_{x}.bias")).reshape(-1) for x in "qkv"]
            if gguf.architecture in PERMUTED_ARCHITECTURES:
                biases[0], biases[1] = unpermute_rows(biases[0], c.n_heads), unpermute_rows(biases[1], c.k_rank)
            attn.b_in = nn.Parameter(torch.cat(biases), requires_grad=False)
        mlp.packed["w_gate_up"] = linear([resident(p + "ffn_gate.weight"), resident(p + "ffn_up.weight")],
                                         *mlp.w_gate_up.shape, f"layer {i} ffn_gate|ffn_up")
        mlp.packed["w_down"] = linear([resident(p + "ffn_down.weight")], *mlp.w_down.shape, f"layer {i} ffn_down")
        for module, key in ((attn, "w_in"), (attn, "w_o"), (mlp, "w_gate_up"), (mlp, "w_down")):
            setattr(module, key, nn.Parameter(placeholder(*getattr(module, key).shape), requires_grad=False))
    embed = resident("token_embd.weight")
    if (embed.rows, embed.cols) != (c.vocab_size, c.d_model):
        raise TPAError(f"{gguf.path}: token_embd is [{embed.rows}, {embed.cols}], the config needs "
                       f"[{c.vocab_size}, {c.d_model}]")
    model.embed = QuantEmbedding(embed)
    model.norm.weight = vector("output_norm.weight", c.d_model)
    if model.lm_head is None:
        model.packed_head = QuantLinear([embed], prefill)
    else:
        model.packed_head = linear([resident("output.weight")], c.vocab_size, c.d_model, "output", dense=False)
        model.lm_head.weight = nn.Parameter(placeholder(c.vocab_size, c.d_model), requires_grad=False)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise TPAError(f"{gguf.path}: some model tensors were not in the file")
    if repacked and packed_dir is not None:
        packed_store.save(packed_dir, {name: m.data for name, m in built.items() if m.packed})
    model.cache_dtype = CACHE_DTYPE
    return model.eval()


def resident_matrices(model) -> list[QuantMatrix]:
    """Every QuantMatrix a built model computes with: its layers' projections, then the LM head's."""
    layers = [m for b in model.layers for m in (*b.attn.packed.values(), *b.mlp.packed.values())]
    return [part for layer in [*layers, model.packed_head] for part in layer.parts]


def resident_bytes_of(model) -> int:
    """Bytes the resident weights of a built model hold (matrices in their blocks, float32 copies held for
    prefill, float32 vectors)."""
    seen: set[int] = set()
    total = 0
    for part in resident_matrices(model):
        if part.data.data_ptr() not in seen:
            seen.add(part.data.data_ptr())
            total += part.nbytes
    dense = sum(layer.dense.numel() * 4 for b in model.layers for layer in (*b.attn.packed.values(),
                                                                           *b.mlp.packed.values())
                if layer.dense is not None)
    return total + dense + sum(p.numel() * p.element_size() for p in model.parameters() if not is_placeholder(p))


def is_placeholder(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a `placeholder` (every stride 0) rather than real weights."""
    return tensor.dim() > 0 and tensor.numel() > 1 and all(s == 0 for s in tensor.stride())
