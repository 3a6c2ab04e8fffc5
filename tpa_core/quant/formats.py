"""GGML block formats the resident-weight path computes with, and what each keeps exact.

A GGUF matrix `[N, K]` is N rows of K / `values` blocks of `bytes` bytes each (see tpa_core/csrc/gguf_matmul.cpp
for the bit layouts). The resident form is those bytes, unchanged or, on CPUs with AVX-512, rearranged without
loss into groups of 16 rows for the decode kernel (`ops.repack`): the codes, the block scales and mins are exactly
the file's. What is rounded is the arithmetic:

- decode and short inputs (up to `linear.INTEGER_MAX_ROWS` rows): every 32 activations (256 for the K-quants,
  as llama.cpp's Q8_K) are rounded to int8 with one float32 scale (as llama.cpp's decode does) and, for files
  under `ONE_LEVEL_MIN_BYTES` (`activation_levels`), the rounding error once more to int8 at 1/256 of that
  scale; the integer dot products are exact, the scale products float32. A product's error is the activation
  rounding: at most one step of the last level, |x| max of the group / 127 (/ (127 * 256) with two levels),
  times the weights' absolute sum over that block (`activation_error_bound`). One int8 level agreed with float32
  on 190 of 196 teacher-forced positions of the default model, two levels on 196.
- F16 / BF16 matrices multiply float32 activations directly: float32 rounding only.
- prefill (more rows): chunks of rows are dequantized to float32 (bit-identical to gguf's `dequantize`) and
  multiplied by a float32 GEMM: the same as the float32 model up to the GEMM's summation order. Files that decode
  with one level, on CPUs with AMX or AVX-512 BF16 (`prefill_dtype`), dequantize to bfloat16 and round the
  activations to bfloat16 too (8 significant bits, about what llama.cpp's int8 activations keep); the GEMM sums in
  float32 and rounds its result to bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class BlockFormat:
    """One GGML type: its id in the file, values and bytes per block, and the byte offsets of its float16
    scale fields (used to write random valid blocks)."""

    name: str
    type_id: int
    values: int
    bytes: int
    half_offsets: tuple[int, ...]

    def row_bytes(self, cols: int) -> int:
        return cols // self.values * self.bytes

    @property
    def activation_group(self) -> int:
        """Activations sharing one scale in the decode product: a K-quant's 256-value super-block (its kernel
        sums the sub-blocks in integers), else 32."""
        return max(self.values, ACTIVATION_BLOCK)


# The types the compiled op computes with; F32 stays a float tensor run by torch.
FORMATS = {f.name: f for f in (
    BlockFormat("F16", 1, 1, 2, ()),
    BlockFormat("BF16", 30, 1, 2, ()),
    BlockFormat("Q4_0", 2, 32, 18, (0,)),
    BlockFormat("Q4_1", 3, 32, 20, (0, 2)),
    BlockFormat("Q5_0", 6, 32, 22, (0,)),
    BlockFormat("Q5_1", 7, 32, 24, (0, 2)),
    BlockFormat("Q8_0", 8, 32, 34, (0,)),
    BlockFormat("Q4_K", 12, 256, 144, (0, 2)),
    BlockFormat("Q5_K", 13, 256, 176, (0, 2)),
    BlockFormat("Q6_K", 14, 256, 210, (208,)),
)}
ACTIVATION_BLOCK = 32  # activations are quantized per this many values
# GGUF files from this size up round decode activations to one int8 level, smaller ones to two. One level is
# llama.cpp's arithmetic and half the integer work, which bounds a large model's decode (benchmarks/NOTES.md,
# "Activation levels"); a small model's per-token overheads hide the second level, which buys its agreement with
# float32 (196 of 196 teacher-forced positions of the default model against 190 with one level).
ONE_LEVEL_MIN_BYTES = 256 * 2**20


def activation_levels(file_bytes: int) -> int:
    """The int8 levels the decode product rounds activations to, for a GGUF file of `file_bytes` bytes."""
    return 1 if file_bytes >= ONE_LEVEL_MIN_BYTES else 2


def prefill_dtype(file_bytes: int) -> torch.dtype:
    """The dtype of the prefill GEMMs for a GGUF file of `file_bytes` bytes: bfloat16 where the file decodes with one
    activation level (its numerics are llama.cpp's, not float32's, already) and the CPU has a fast bf16 GEMM
    (`ops.fast_bf16_gemm`); else float32, the float32 model's up to summation order."""
    from tpa_core.quant import ops

    return torch.bfloat16 if activation_levels(file_bytes) == 1 and ops.fast_bf16_gemm() else torch.float32


# The factor (K/V) cache of every resident model, as llama.cpp's by default: half the bytes a decode step reads
# from the cache (1.3x faster decode at 4,000 tokens of context) and the store keeps per token. On the default
# model's answer sets it changed none of 49 greedy answers (benchmarks/NOTES.md).
CACHE_DTYPE = torch.float16


def activation_error_bound(weight: torch.Tensor, x: torch.Tensor, group: int = ACTIVATION_BLOCK,
                           levels: int = 2) -> torch.Tensor:
    """Worst-case |y - x @ w^T| of the int8 activation product, before float32 summation error.

    weight `[N, K]` (dequantized), x `[M, K]` -> `[M, N]`; `group`: activations sharing a scale
    (`BlockFormat.activation_group`). Rounding moves each x by at most one step of the last level, the group's
    max |x| / 127 (one level; / (127 * 256) with two), so a group adds at most that times the sum of |w| over it.
    """
    M, K = x.shape
    unit = 127.0 if levels == 1 else 127.0 * 256.0
    step = x.view(M, K // group, group).abs().amax(-1) / unit  # [M, K/group]
    w_abs = weight.abs().view(weight.shape[0], K // group, group).sum(-1)  # [N, K/group]
    return step @ w_abs.t()  # [M, N]


def random_blocks(name: str, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """Random valid GGML blocks of type `name` for a `[rows, cols]` matrix: uniform random codes, and float16
    scales/mins drawn around `scale` / 16 (any finite value is valid; these keep the weights near `scale`).
    Returns `[rows, row_bytes]` uint8."""
    fmt = FORMATS[name]
    if name in ("F16", "BF16"):
        values = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        if name == "F16":
            return values.astype(np.float16).view(np.uint8).reshape(rows, -1)
        bits = values.view(np.uint32) >> 16  # truncation is a valid bf16 of the value
        return bits.astype(np.uint16).view(np.uint8).reshape(rows, -1)
    if cols % fmt.values:
        raise ValueError(f"{name} rows need a multiple of {fmt.values} values, not {cols}")
    n_blocks = rows * cols // fmt.values
    blocks = rng.integers(0, 256, size=(n_blocks, fmt.bytes), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.5, n_blocks) * scale / _CODE_SPAN[name]).astype(np.float32)  # [n_blocks]
    halves = [d]
    if len(fmt.half_offsets) == 2:  # the min (Q4_1, Q5_1: m, added) or dmin (K-quants: subtracted) centres codes
        centre = _CODE_SPAN[name] / 2 if name in ("Q4_1", "Q5_1") else 1.0
        halves.append(-d * centre if name in ("Q4_1", "Q5_1") else d * centre)
    for offset, value in zip(fmt.half_offsets, halves):
        blocks[:, offset:offset + 2] = value.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, fmt.row_bytes(cols))


# The typical |code x sub-block scale| of a random block, so that random weights come out near `scale`.
_CODE_SPAN = {"Q4_0": 8, "Q4_1": 16, "Q5_0": 16, "Q5_1": 32, "Q8_0": 64, "Q4_K": 16 * 32, "Q5_K": 32 * 32,
              "Q6_K": 32 * 64}
