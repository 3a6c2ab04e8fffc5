"""Weight-only 4-bit decoding from a GGUF's Q4_1 blocks, through torch's CPU int4 kernels.

A Q4_1 block holds 32 weights of one row as `w = d * q + m`: codes q in 0..15, d and m float16. torch's CPU int4
GEMM (`aten._weight_int4pack_mm_for_cpu`, torch 2.13) computes with `w = (q - 8) * scale + zero` per group of
`GROUP_SIZE` consecutive input features, so a Q4_1 block is one group with

    scale = d,    zero = m + 8 d.

The codes are packed unchanged (`aten._convert_weight_to_int4pack_for_cpu`, `[N, K]` int32 -> `[N, K/2]` uint8).
What the kernel cannot hold exactly: on torch 2.13 only its bfloat16 form is fast (benchmarks/NOTES.md, "CPU
engine"), and that form takes bfloat16 activations, bfloat16 scales and zeros, and returns bfloat16. So the codes
are exact, while d (11 significant bits) and m + 8 d are rounded to bfloat16 (8 bits):
a weight moves by at most 2^-9 of |scale| * 8 + |zero|, a small fraction of one quantization step. Logits differ
from the float32 path accordingly: this is an opt-in decode mode, like float16.

A Q8_0 matrix (`w = d * q`, q int8; SmolLM2's token embedding, which is also its tied LM head, the largest read
of a decode step) is held exactly in codes too, as two 4-bit halves (`Q8Weight`), with the same bfloat16 rounding
of d.

`attach_q4(model, gguf_path)` packs every Q4_1 projection of a loaded `TPAModel` and a Q4_1/Q8_0 LM head (after
checking that the GGUF's blocks reproduce the model's float32 weights bit for bit) and hangs the packed copies
next to the float32 parameters. `tpa_core.attention.linear` uses a packed copy for single-row inputs (decode of
one sequence) only; prefill keeps the float32 weights (oneDNN's GEMM is fast there, and prefilled factors stay
those of float32). Tensors of other GGML types (F32, Q5_K, ...) stay float32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tpa_core.errors import TPAError

logger = logging.getLogger(__name__)

GROUP_SIZE = 32  # a Q4_1 block = one quantization group of the int4 kernel
Q4_1_BLOCK_BYTES = 20  # float16 d, float16 m, 16 bytes of 4-bit codes
Q8_0_BLOCK_BYTES = 34  # float16 d, 32 int8 codes
ROW_MULTIPLE = 16  # the packing op's demand on N (output features)
PACKED_FILE = "q4.safetensors"  # the packed copies, kept in the model's cache folder
PACKED_FORMAT = "tpa-rag-q4/1"
PACKED_MAX_ROWS = 1  # inputs of more rows (prefill) run on the float32 weights
KERNEL_DTYPE = torch.bfloat16  # the int4 kernel's fast form (see the module docstring)


class Q4Weight:
    """A `[N, K]` weight as packed 4-bit codes plus per-group scale and zero, run by torch's CPU int4 GEMM.

    packed: `[N, K/2]` uint8 (the kernel's layout); scales_zeros: `[K/G, N, 2]` bfloat16 (scale, zero) with
    `w[n, k] = (q[n, k] - 8) * scale[k // G, n] + zero[k // G, n]`. A plain object, not an nn.Module, so it stays
    out of the model's state dict (whose names docs/interfaces.md fixes).
    """

    def __init__(self, packed: Tensor, scales_zeros: Tensor, out_features: int, in_features: int) -> None:
        self.packed, self.scales_zeros = packed, scales_zeros
        self.out_features, self.in_features = out_features, in_features

    def __call__(self, x: Tensor) -> Tensor:
        """x `[..., K]` -> `[..., N]` in x's dtype."""
        x2 = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # [M, K]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP_SIZE, self.scales_zeros)  # [M, N]
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)  # [..., N]

    def dequantize(self) -> Tensor:
        """The weight the kernel multiplies by, `[N, K]` float32 (rounded to bfloat16 by the kernel's output)."""
        eye = torch.eye(self.in_features, dtype=KERNEL_DTYPE)  # [K, K]
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP_SIZE, self.scales_zeros)  # [K, N]
        return w_t.t().float()  # [N, K]

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + \
            self.scales_zeros.numel() * self.scales_zeros.element_size()


class Q8Weight:
    """A Q8_0 weight `[N, K]` (`w = d * q`, q int8) as two 4-bit halves run in one int4 GEMM of `2N` rows.

    q = 16 hi + lo with hi in -8..7 and lo in 0..15, so `d q = (hi + 8 - 8) (16 d) + (lo - 8) d + 8 d`: the high
    half has scale 16 d and zero 0, the low half scale d and zero 8 d. Both are exact in the codes; d is rounded
    to bfloat16 as for Q4_1 (and 16 bf16(d), 8 bf16(d) are exact), so the kernel multiplies by `bf16(d) * q`.
    """

    def __init__(self, halves: Q4Weight) -> None:
        self.halves = halves  # rows [0, N): high halves, rows [N, 2N): low halves
        self.out_features, self.in_features = halves.out_features // 2, halves.in_features

    def __call__(self, x: Tensor) -> Tensor:
        """x `[..., K]` -> `[..., N]` in x's dtype."""
        y = self.halves(x)  # [..., 2N]
        return y[..., :self.out_features] + y[..., self.out_features:]  # [..., N]

    def dequantize(self) -> Tensor:
        """`[N, K]` float32: the sum of the two halves' kernel weights."""
        w = self.halves.dequantize()  # [2N, K]
        return w[:self.out_features] + w[self.out_features:]

    @property
    def nbytes(self) -> int:
        return self.halves.nbytes


def split_q8_0(raw: np.ndarray, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """A GGUF Q8_0 tensor's bytes -> (codes `[rows, cols]` int8, d `[rows, cols/32]` float32)."""
    if cols % GROUP_SIZE:
        raise TPAError(f"a Q8_0 row of {cols} values is not a whole number of {GROUP_SIZE}-value blocks")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // GROUP_SIZE, Q8_0_BLOCK_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [rows, n_blocks]
    codes = blocks[..., 2:].copy().view(np.int8)  # [rows, n_blocks, 32]
    return torch.from_numpy(codes.reshape(rows, cols)), torch.from_numpy(d)


def dequantize_q8_0(codes: Tensor, d: Tensor) -> Tensor:
    """codes `[N, K]` int8, d `[N, K/32]` -> `[N, K]` float32, with gguf's arithmetic (`q * d` in float32)."""
    N, K = codes.shape
    w = codes.view(N, K // GROUP_SIZE, GROUP_SIZE).float() * d[:, :, None]  # [N, K/G, G]
    return w.reshape(N, K)


def pack_q8_0(codes: Tensor, d: Tensor) -> Q8Weight:
    """Pack Q8_0 codes `[N, K]` (int8) with their block scales d `[N, K/32]` as two 4-bit halves (Q8Weight)."""
    q = codes.to(torch.int32)
    hi, lo = q >> 4, q & 15  # floor division: q = 16 hi + lo, hi in -8..7, lo in 0..15
    halves = pack_q4(torch.cat([hi + 8, lo]).to(torch.uint8), torch.cat([16 * d, d]),
                     torch.cat([-128 * d, torch.zeros_like(d)]))  # zeros m + 8 d: 0 (high), 8 d (low)
    return Q8Weight(halves)


def split_q4_1(raw: np.ndarray, rows: int, cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """A GGUF Q4_1 tensor's bytes -> (codes `[rows, cols]` uint8 in 0..15, d `[rows, cols/32]` float32,
    m `[rows, cols/32]` float32), so that `d * codes + m` (per block) is the GGUF's dequantized tensor."""
    if cols % GROUP_SIZE:
        raise TPAError(f"a Q4_1 row of {cols} values is not a whole number of {GROUP_SIZE}-value blocks")
    n_blocks = cols // GROUP_SIZE
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, n_blocks, Q4_1_BLOCK_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [rows, n_blocks]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)  # [rows, n_blocks]
    qs = blocks[..., 4:]  # [rows, n_blocks, 16]: byte j holds code j (low nibble) and code j + 16 (high)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [rows, n_blocks, 32]
    return (torch.from_numpy(codes.reshape(rows, cols)), torch.from_numpy(d), torch.from_numpy(m))


def dequantize_q4_1(codes: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """codes `[N, K]`, d/m `[N, K/32]` -> `[N, K]` float32, with gguf's arithmetic (`d * q + m` in float32)."""
    N, K = codes.shape
    w = d[:, :, None] * codes.view(N, K // GROUP_SIZE, GROUP_SIZE).float() + m[:, :, None]  # [N, K/G, G]
    return w.reshape(N, K)


def pack_q4(codes: Tensor, d: Tensor, m: Tensor) -> Q4Weight:
    """Pack Q4_1 codes `[N, K]` (0..15) with their block d, m `[N, K/32]` for the int4 kernel (see module doc)."""
    N, K = codes.shape
    if K % GROUP_SIZE or N % ROW_MULTIPLE or d.shape != (N, K // GROUP_SIZE) or m.shape != d.shape:
        raise TPAError(f"cannot pack codes {tuple(codes.shape)} with scales {tuple(d.shape)}, {tuple(m.shape)}: "
                       f"the int4 kernel needs rows in multiples of {ROW_MULTIPLE}, columns of {GROUP_SIZE}")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)  # [N, K/2]
    zero = m + 8 * d  # (q - 8) d + (m + 8 d) = d q + m
    scales_zeros = torch.stack([d.t(), zero.t()], dim=-1).to(KERNEL_DTYPE).contiguous()  # [K/G, N, 2]
    return Q4Weight(packed, scales_zeros, N, K)


def attach_q4(model, gguf_path: str | Path) -> int:
    """Pack the Q4_1 projections of `model` (a float32 CPU TPAModel loaded from `gguf_path`) for decoding.

    Each fused projection (attention `w_in` = q|k|v rows, MLP `w_gate_up` = gate|up rows) is packed only when all
    its parts are Q4_1; `w_o` and `w_down` likewise; the LM head (`output`, or `token_embd` when tied) when it is
    Q4_1 or Q8_0. Matrices whose row count is not a multiple of 16 stay float32. Before packing, the blocks must
    reproduce the model's float32 weight bit for bit (TPAError otherwise: the model does not hold this file's
    weights). Returns the number of packed matrices.
    """
    from tpa_core.gguf import PERMUTED_ARCHITECTURES, GGUFFile, unpermute_rows

    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise TPAError(f"4-bit weights run on the CPU in float32 (torch's CPU int4 kernels); this model is "
                       f"{model.dtype} on {model.device}")
    gguf = GGUFFile(gguf_path)
    permuted = gguf.architecture in PERMUTED_ARCHITECTURES
    cfg = model.config

    def blocks(name: str, heads: int | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
        if name not in gguf.tensor_names or gguf.tensor_type(name) != "Q4_1":
            return None
        info = gguf._get(name)
        cols, rows = (int(n) for n in info.shape)  # GGUF dims are innermost first
        parts = split_q4_1(info.data, rows, cols)
        if permuted and heads is not None:  # the rows of attn_q / attn_k, as tpa_core.gguf un-permutes them
            parts = tuple(unpermute_rows(t, heads) for t in parts)
        return parts

    def pack(names: list[tuple[str, int | None]], weight: Tensor, label: str) -> Q4Weight | None:
        got = [blocks(name, heads) for name, heads in names]
        if any(g is None for g in got) or weight.shape[0] % ROW_MULTIPLE:
            return None
        codes, d, m = (torch.cat([g[i] for g in got], dim=0) for i in range(3))  # rows of the fused parts
        if codes.shape != weight.shape or not torch.equal(dequantize_q4_1(codes, d, m), weight.detach()):
            raise TPAError(f"{gguf_path}: the Q4_1 blocks of {label} do not reproduce the model's float32 weight; "
                           f"the model was not converted from this file")
        return pack_q4(codes, d, m)

    count = 0
    for i, block in enumerate(model.layers):
        attn, mlp, p = block.attn, block.mlp, f"blk.{i}."
        if attn.form == "fixed":  # GGUF models always are; biases stay float32 and are added after
            found = {
                "w_in": pack([(p + "attn_q.weight", cfg.n_heads), (p + "attn_k.weight", cfg.k_rank),
                              (p + "attn_v.weight", None)], attn.w_in, f"layer {i} attention q|k|v"),
                "w_o": pack([(p + "attn_output.weight", None)], attn.w_o, f"layer {i} attn_output"),
            }
            attn.packed.update({k: v for k, v in found.items() if v is not None})
            count += sum(v is not None for v in found.values())
        found = {
            "w_gate_up": pack([(p + "ffn_gate.weight", None), (p + "ffn_up.weight", None)], mlp.w_gate_up,
                              f"layer {i} ffn_gate|ffn_up"),
            "w_down": pack([(p + "ffn_down.weight", None)], mlp.w_down, f"layer {i} ffn_down"),
        }
        mlp.packed.update({k: v for k, v in found.items() if v is not None})
        count += sum(v is not None for v in found.values())
    head_name = "token_embd.weight" if model.lm_head is None else "output.weight"
    head = model.embed.weight if model.lm_head is None else model.lm_head.weight
    if head_name in gguf.tensor_names and gguf.tensor_type(head_name) == "Q8_0" and \
            head.shape[0] % ROW_MULTIPLE == 0:
        info = gguf._get(head_name)
        codes, d = split_q8_0(info.data, head.shape[0], head.shape[1])
        if not torch.equal(dequantize_q8_0(codes, d), head.detach()):
            raise TPAError(f"{gguf_path}: the Q8_0 blocks of {head_name} do not reproduce the model's float32 "
                           f"weight; the model was not converted from this file")
        model.packed_head = pack_q8_0(codes, d)
    else:
        model.packed_head = pack([(head_name, None)], head, head_name)
    count += model.packed_head is not None
    logger.info("packed %d matrices of %s for 4-bit decoding (LM head %s)", count, gguf_path,
                "packed" if model.packed_head is not None else "left in float32")
    return count


# ----- keeping the packed copies in the model cache ---------------------------------------------------------
def packed_state(model) -> dict[str, Tensor]:
    """The packed copies of `model` as flat tensors: `layers.{i}.{attn|mlp}.{w_*}.{packed|scales_zeros}` and
    `packed_head.{q4|q8}.{packed|scales_zeros}`."""
    out: dict[str, Tensor] = {}
    for i, block in enumerate(model.layers):
        for owner, module in (("attn", block.attn), ("mlp", block.mlp)):
            for key, weight in module.packed.items():
                out[f"layers.{i}.{owner}.{key}.packed"] = weight.packed
                out[f"layers.{i}.{owner}.{key}.scales_zeros"] = weight.scales_zeros
    head = model.packed_head
    if head is not None:
        kind, weight = ("q8", head.halves) if isinstance(head, Q8Weight) else ("q4", head)
        out[f"packed_head.{kind}.packed"] = weight.packed
        out[f"packed_head.{kind}.scales_zeros"] = weight.scales_zeros
    return out


def assign_packed_state(model, tensors: dict[str, Tensor]) -> int:
    """Hang the packed copies of `packed_state` back onto `model`; ValueError if they do not fit its weights."""
    def weight(prefix: str, rows: int, cols: int) -> Q4Weight:
        packed, scales_zeros = tensors[prefix + ".packed"], tensors[prefix + ".scales_zeros"]
        if (tuple(packed.shape) != (rows, cols // 2) or packed.dtype != torch.uint8
                or tuple(scales_zeros.shape) != (cols // GROUP_SIZE, rows, 2) or scales_zeros.dtype != KERNEL_DTYPE):
            raise ValueError(f"{prefix} has shapes {tuple(packed.shape)}, {tuple(scales_zeros.shape)}; "
                             f"the model's weight is [{rows}, {cols}]")
        return Q4Weight(packed, scales_zeros, rows, cols)

    count = 0
    for name in tensors:
        parts = name.split(".")
        if name.startswith("layers.") and parts[-1] == "packed" and len(parts) == 5:
            block = model.layers[int(parts[1])]
            module = block.attn if parts[2] == "attn" else block.mlp
            rows, cols = getattr(module, parts[3]).shape
            module.packed[parts[3]] = weight(name.rpartition(".")[0], rows, cols)
            count += 1
    head = model.embed.weight if model.lm_head is None else model.lm_head.weight
    V, d = head.shape
    if "packed_head.q8.packed" in tensors:
        model.packed_head = Q8Weight(weight("packed_head.q8", 2 * V, d))
    elif "packed_head.q4.packed" in tensors:
        model.packed_head = weight("packed_head.q4", V, d)
    return count + (model.packed_head is not None)


def attach_q4_cached(model, gguf_path: str | Path, cache_dir: str | Path) -> int:
    """`attach_q4`, keeping the packed copies in `cache_dir/q4.safetensors` (memory-mapped on later loads; packing
    re-runs when the file is missing, damaged, or was written by another torch version: the packed layout is
    torch's own). Returns the number of packed matrices."""
    import os
    import tempfile

    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / PACKED_FILE
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            if meta.get("format") == PACKED_FORMAT and meta.get("torch") == torch.__version__:
                return assign_packed_state(model, load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError, KeyError, IndexError) as exc:
            logger.warning("packed 4-bit weights %s are damaged (%s); packing again", path, exc)
        for module in [b.attn for b in model.layers] + [b.mlp for b in model.layers]:
            module.packed.clear()
        model.packed_head = None
    count = attach_q4(model, gguf_path)
    if count:
        handle, tmp = tempfile.mkstemp(prefix=".q4-", suffix=".safetensors", dir=path.parent)
        os.close(handle)
        try:
            save_file(packed_state(model), tmp, metadata={"format": PACKED_FORMAT, "torch": torch.__version__})
            os.replace(tmp, path)
        except OSError as exc:  # a read-only cache still runs, it just packs again next time
            logger.warning("could not keep the packed 4-bit weights in %s (%s)", path, exc)
            Path(tmp).unlink(missing_ok=True)
    return count
