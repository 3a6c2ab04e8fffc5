"""Matrices resident in their GGUF blocks, and the linear layers and embedding that compute with them.

`QuantMatrix` is one GGUF matrix `[rows, cols]`: its block bytes `[rows, row_bytes]` (uint8, usually a view of the
memory-mapped file) or, for F32 and the types the op does not compute with, a float32 tensor. `QuantLinear`
stacks matrices along the output dim (a fused q|k|v or gate|up projection whose parts may differ in type, as in
Q4_K_M files). Inputs of up to `INTEGER_MAX_ROWS` rows (decode, a follow-up question's tokens) run the compiled
integer op; longer ones (prefill) dequantize a chunk of rows at a time into a reused scratch buffer and run a
float32 GEMM (`tpa_core.quant.formats` says what each path rounds), or multiply a float32 copy held for prefill
(`QuantLinear.keep_dense`).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from tpa_core.quant import ops
from tpa_core.quant.formats import BlockFormat

# Inputs of up to this many rows run the integer op; more rows dequantize and run a float GEMM. A row costs the
# integer op one pass over the weight's codes per 32 activations, the GEMM path one dequantization per matrix (or,
# with a float32 copy held, one read of it). Measured on AVX-512 at one and two threads (benchmarks/NOTES.md,
# "Short extends"): at 64 rows the integer op is 1.1-3.2x faster for every type but Q6_K (0.93x), at 16 rows 2.3-10x.
INTEGER_MAX_ROWS = 64
SCRATCH_VALUES = 1 << 23  # float32 values dequantized per chunk (32 MiB per thread)
_scratch = threading.local()


def _scratch_buffer(values: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A buffer of at least `values` entries of `dtype`, reused across calls of this thread."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < values:
        buf = buffers[dtype] = torch.empty(values, dtype=dtype)
    return buf[:values]


class QuantMatrix:
    """One weight matrix `[rows, cols]` in GGUF blocks (`fmt` set, `data` uint8 `[rows, row_bytes]`) or in
    float32 (`fmt` None, `data` float32 `[rows, cols]`). `order` (int64 `[rows]`, optional): row i of the matrix is
    stored row `order[i]` (llama.cpp's permuted Q/K rows, left in place: outputs are reordered instead).
    `levels`: the int8 levels the decode product rounds activations to (`formats.activation_levels`).
    `packed`: `data` is `ops.repack`'s row-interleaved layout of the blocks (rows in matrix order, no `order`)."""

    def __init__(self, data: Tensor, fmt: BlockFormat | None, rows: int, cols: int,
                 order: Tensor | None = None, levels: int = 2, packed: bool = False) -> None:
        if packed and (fmt is None or order is not None):
            raise ValueError("a packed matrix has a block format and its rows in matrix order")
        row_bytes = ops.packed_row_bytes(fmt.type_id, cols) if packed else cols if fmt is None else fmt.row_bytes(cols)
        expected = (rows, row_bytes)
        if tuple(data.shape) != expected or data.dtype != (torch.float32 if fmt is None else torch.uint8):
            raise ValueError(f"a {fmt.name if fmt else 'F32'} matrix [{rows}, {cols}] needs data {expected}, "
                             f"got {tuple(data.shape)} {data.dtype}")
        if order is not None and tuple(order.shape) != (rows,):
            raise ValueError(f"a row order for {rows} rows has shape {tuple(order.shape)}")
        if levels not in (1, 2):
            raise ValueError(f"activations are rounded in 1 or 2 int8 levels, not {levels}")
        self.data, self.fmt, self.rows, self.cols, self.order, self.levels = data, fmt, rows, cols, order, levels
        self.packed = packed

    @property
    def type_name(self) -> str:
        return "F32" if self.fmt is None else self.fmt.name

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def matmul(self, x: Tensor) -> Tensor:
        """x `[M, cols]` float32 (M small) -> `[M, rows]` float32 through the integer op (or float32 GEMV)."""
        if self.fmt is None:
            y = x @ self.data.t()  # [M, rows]
        else:
            y = ops.matmul(x, self.data, self.fmt.type_id, self.cols, self.levels, self.packed)  # [M, rows] stored
        return y if self.order is None else y.index_select(1, self.order)

    def dequantize_rows(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Rows [start, stop) as float32 `[stop - start, cols]` (into `out` when given); a packed matrix takes
        whole groups of rows (`ops.packed_group`)."""
        group = ops.packed_group() if self.packed else 1
        if start % group or stop % group:
            raise ValueError(f"a packed matrix's rows are read {group} at a time, not [{start}, {stop})")
        stored = self.data[start:stop] if self.order is None else self.data.index_select(0, self.order[start:stop])
        if self.fmt is None:
            return stored if out is None else out.copy_(stored)
        if out is None:
            out = torch.empty(stop - start, self.cols, dtype=torch.float32)
        return ops.dequantize_into(stored, self.fmt.type_id, self.cols, out, self.packed)

    def lookup(self, rows: Tensor) -> Tensor:
        """Rows `rows` (int64 `[T]`, any order) as float32 `[T, cols]`, dequantized exactly."""
        if self.fmt is None:
            return self.data.index_select(0, rows)
        codes = ops.unpack(self.data, self.fmt.type_id, self.cols, rows) if self.packed else \
            self.data.index_select(0, rows if self.order is None else self.order.index_select(0, rows))
        return ops.dequantize_into(codes, self.fmt.type_id, self.cols, torch.empty(rows.numel(), self.cols))

    def dequantize(self) -> Tensor:
        """The whole matrix as float32 `[rows, cols]` (tests and diagnostics; the model never holds one)."""
        return self.dequantize_rows(0, self.rows, torch.empty(self.rows, self.cols, dtype=torch.float32))


class QuantLinear:
    """y = x @ W^T with W `[N, K]` the row-wise stack of `parts` (QuantMatrix, same K). A plain object, not an
    nn.Module: the model's state dict keeps its own names. `prefill_dtype`: the dtype of the prefill GEMM
    (`formats.prefill_dtype`); its output is float32 either way. `dense`: W dequantized once (`keep_dense`), which
    prefill then multiplies directly, as the float32 model does, instead of dequantizing chunks per call."""

    def __init__(self, parts: list[QuantMatrix], prefill_dtype: torch.dtype = torch.float32) -> None:
        if not parts or len({p.cols for p in parts}) != 1:
            raise ValueError("a QuantLinear needs one or more matrices of the same column count")
        if prefill_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"prefill runs in float32 or bfloat16, not {prefill_dtype}")
        self.parts, self.prefill_dtype = parts, prefill_dtype
        self.in_features = parts[0].cols
        self.out_features = sum(p.rows for p in parts)
        self.dense: Tensor | None = None  # [N, K] float32

    @property
    def nbytes(self) -> int:
        dense = 0 if self.dense is None else self.dense.numel() * self.dense.element_size()
        return sum(p.nbytes for p in self.parts) + dense

    def keep_dense(self) -> None:
        """Hold W in float32 for prefill (decode keeps computing with the blocks): prefill then runs the float32
        model's GEMM on the float32 model's weights (the exact dequantization), at the memory cost of W in float32."""
        self.dense = self.dequantize()

    def __call__(self, x: Tensor) -> Tensor:
        """x `[..., K]` -> `[..., N]` float32."""
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features).float()  # [M, K]
        if rows <= INTEGER_MAX_ROWS:
            outs = [p.matmul(x2) for p in self.parts]  # [M, rows of each part]
            y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [M, N]
        else:
            y = self._prefill(x2)
        return y.view(*x.shape[:-1], self.out_features)  # [..., N]

    def _prefill(self, x2: Tensor) -> Tensor:
        """x2 `[M, K]` -> `[M, N]`: the float32 GEMM with `dense` where it is held, else each chunk of rows
        dequantized into the scratch buffer, then a GEMM in `prefill_dtype`."""
        from tpa_core.attention import (
            linear as float_linear,  # oneDNN for many rows (see its docstring)
        )

        if self.dense is not None:
            return float_linear(x2, self.dense)  # [M, N]
        dtype = self.prefill_dtype
        x_in = x2 if dtype == torch.float32 else x2.to(dtype)  # [M, K]
        y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)  # [M, N]
        group = ops.packed_group() if any(p.packed for p in self.parts) else 1
        chunk = max(group, SCRATCH_VALUES // self.in_features // group * group)
        col = 0
        for part in self.parts:
            for start in range(0, part.rows, chunk):
                stop = min(part.rows, start + chunk)
                if part.fmt is None:
                    w = part.dequantize_rows(start, stop).to(dtype)
                else:
                    buf = _scratch_buffer((stop - start) * self.in_features, dtype).view(stop - start,
                                                                                        self.in_features)
                    w = part.dequantize_rows(start, stop, buf)  # [n, K]
                y[:, col + start:col + stop] = float_linear(x_in, w)  # [M, n]
            col += part.rows
        return y

    def dequantize(self) -> Tensor:
        """W as float32 `[N, K]`, each part dequantized straight into its rows."""
        out = torch.empty(self.out_features, self.in_features, dtype=torch.float32)  # [N, K]
        row = 0
        for part in self.parts:
            part.dequantize_rows(0, part.rows, out[row:row + part.rows])
            row += part.rows
        return out


class QuantEmbedding(nn.Module):
    """A token embedding whose table `[V, d]` stays in GGUF blocks; looked-up rows are dequantized exactly.

    `weight` is a placeholder of the table's shape and dtype (one float32 value broadcast, no memory) so that
    code reading the model's shapes, dtype and device works; `matrix` holds the real table.
    """

    def __init__(self, matrix: QuantMatrix) -> None:
        super().__init__()
        self.matrix = matrix
        self.num_embeddings, self.embedding_dim = matrix.rows, matrix.cols
        self.weight = nn.Parameter(placeholder(matrix.rows, matrix.cols), requires_grad=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens `[...]` int64 -> `[..., d]` float32."""
        rows = self.matrix.lookup(tokens.reshape(-1))  # [T, d]
        return rows.view(*tokens.shape, self.matrix.cols)


def placeholder(rows: int, cols: int) -> Tensor:
    """A `[rows, cols]` float32 tensor that occupies one value (stride 0): stands in for a resident matrix."""
    return torch.zeros((), dtype=torch.float32).expand(rows, cols)
