"""`FactorCache`: the per-layer TPA factor buffers of a batch of sequences.

Per factor name one storage tensor for all layers, `[L, B, T_cap, ...]` (docs/interfaces.md):

| name | per layer | present |
|---|---|---|
| `bk` | `[B, T_cap, R_K, D]` | always (RoPE applied) |
| `bv` | `[B, T_cap, R_V, D]` | always |
| `ak` | `[B, T_cap, H, R_K]` | contextual K/V only |
| `av` | `[B, T_cap, H, R_V]` | contextual K/V only |

A layer's buffers are views of the storage, handed to the attention kernels as they are (last dim contiguous;
never permuted or copied per call). Capacity grows by doubling, so appending a token is amortized O(1).
`lengths[b]` is the number of valid tokens of sequence b; positions past it are garbage and never read.

The storage and `lengths` are inference tensors, created and changed only under `torch.inference_mode` (every
method enters it), so a cache grown during generation can be imported into or truncated from anywhere.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from tpa_core.config import TPAConfig
from tpa_core.errors import TPAError

logger = logging.getLogger(__name__)


def factor_shapes(config: TPAConfig) -> dict[str, tuple[int, ...]]:
    """Per-token shape of each cached factor, in storage order, for `config`."""
    H, D, RK, RV = config.n_heads, config.head_dim, config.k_rank, config.v_rank
    shapes: dict[str, tuple[int, ...]] = {}
    if config.contextual_kv:
        shapes["ak"] = (H, RK)
    shapes["bk"] = (RK, D)
    if config.contextual_kv:
        shapes["av"] = (H, RV)
    shapes["bv"] = (RV, D)
    return shapes


def nbytes_per_token(config: TPAConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Cache bytes per token over all layers for `config` stored in `dtype`."""
    element = torch.empty((), dtype=dtype).element_size()
    per_layer = sum(math.prod(shape) for shape in factor_shapes(config).values())
    return per_layer * config.n_layers * element


class FactorCache:
    """Factor buffers for `batch_size` sequences of one model.

    Attributes: `storage[name]` `[L, B, T_cap, ...]`; `lengths` `[B]` int32 on the cache's device (read it,
    change it only through the methods); `capacity` (T_cap); `names` (the factor names, storage order).
    """

    @torch.inference_mode()
    def __init__(self, config: TPAConfig, batch_size: int = 1, capacity: int = 256,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if batch_size <= 0:
            raise TPAError(f"FactorCache batch_size must be positive, got {batch_size}")
        if capacity <= 0:
            raise TPAError(f"FactorCache capacity must be positive, got {capacity}")
        self.config = config
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.shapes = factor_shapes(config)
        self.names = tuple(self.shapes)
        self.capacity = capacity
        # Zero-filled, not empty: a masked position is multiplied by a zero probability in dense attention paths,
        # and 0 * NaN from uninitialized memory would poison the output.
        self.storage: dict[str, Tensor] = {
            name: torch.zeros((config.n_layers, batch_size, capacity, *shape), dtype=dtype, device=self.device)
            for name, shape in self.shapes.items()
        }
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self._lens = [0] * batch_size  # host mirror of `lengths`: no device sync to read a length

    # ----- sizes ---------------------------------------------------------------------------------------------
    def length(self, seq: int = 0) -> int:
        """Valid tokens of sequence `seq`."""
        self._check_seq(seq)
        return self._lens[seq]

    def nbytes_per_token(self) -> int:
        """Bytes one token takes in this cache, all layers and factors together."""
        return nbytes_per_token(self.config, self.dtype)

    @torch.inference_mode()
    def reserve(self, total: int) -> None:
        """Make room for `total` tokens per sequence, doubling the capacity (contents preserved, capped at the
        model's context window unless `total` itself is larger)."""
        if total <= self.capacity:
            return
        new_cap = self.capacity
        while new_cap < total:
            new_cap *= 2
        # no slack past the context window: the model never runs beyond it
        new_cap = max(total, min(new_cap, self.config.max_position_embeddings))
        keep = max(self._lens)
        for name, old in self.storage.items():
            new = torch.empty((old.shape[0], old.shape[1], new_cap, *old.shape[3:]), dtype=old.dtype,
                              device=old.device)
            new[:, :, :keep].copy_(old[:, :, :keep])
            new[:, :, keep:].zero_()
            self.storage[name] = new
        logger.debug("factor cache grown from %d to %d tokens", self.capacity, new_cap)
        self.capacity = new_cap

    # ----- views and writes (the model's side) ---------------------------------------------------------------
    def layer(self, i: int, rows: slice | None = None) -> dict[str, Tensor]:
        """Views of layer i's buffers, `name -> [B, T_cap, ...]` (rows of the batch: a slice, default all)."""
        rows = rows if rows is not None else slice(None)
        return {name: store[i, rows] for name, store in self.storage.items()}

    @torch.inference_mode()
    def write(self, i: int, factors: dict[str, Tensor], starts: list[int], rows: slice | None = None) -> None:
        """Write layer i's new factors `name -> [B', N, ...]` at positions `starts[b] ..` of rows `rows`.

        Capacity must have been reserved; lengths are not changed (see `advance`).
        """
        rows = rows if rows is not None else slice(None)
        for name, value in factors.items():
            dest = self.storage[name][i, rows]  # [B', T_cap, ...]
            n = value.shape[1]
            first = starts[0]
            if all(s == first for s in starts):
                dest[:, first:first + n].copy_(value)
            else:
                for b, start in enumerate(starts):
                    dest[b, start:start + n].copy_(value[b])

    @torch.inference_mode()
    def advance(self, n: int, rows: slice | None = None) -> None:
        """Count `n` more valid tokens for the sequences in `rows` (default all), after all layers are written."""
        idx = range(self.batch_size)[rows if rows is not None else slice(None)]
        for b in idx:
            self._lens[b] += n
        if len(idx) == self.batch_size:
            self.lengths.add_(n)
        else:
            self.lengths[idx.start:idx.stop] += n

    # ----- sequence management ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def truncate(self, seq: int, length: int) -> None:
        """Keep the first `length` tokens of sequence `seq` (for regenerate / a shorter shared prefix)."""
        self._check_seq(seq)
        if not 0 <= length <= self._lens[seq]:
            raise TPAError(f"truncate: length {length} outside 0..{self._lens[seq]} for sequence {seq}")
        self._set_length(seq, length)

    @torch.inference_mode()
    def reset(self) -> None:
        """Empty every sequence (the buffers are kept)."""
        self._lens = [0] * self.batch_size
        self.lengths.zero_()

    def export(self, seq: int, start: int, end: int) -> dict[str, Tensor]:
        """Tokens `start:end` of sequence `seq`: `layers.{i}.{name} -> [T, ...]`, contiguous CPU copies."""
        self._check_seq(seq)
        if not 0 <= start <= end <= self._lens[seq]:
            raise TPAError(f"export: range {start}:{end} outside the {self._lens[seq]} tokens of sequence {seq}")
        out: dict[str, Tensor] = {}
        for i in range(self.config.n_layers):
            for name, store in self.storage.items():
                out[f"layers.{i}.{name}"] = store[i, seq, start:end].to("cpu", copy=True).contiguous()
        return out

    @torch.inference_mode()
    def import_(self, tensors: dict[str, Tensor], seq: int, at: int) -> int:
        """Write an `export` dict into sequence `seq` at position `at`; the sequence then ends after it.

        Returns the new length of the sequence. The dict must hold every layer and factor of this cache,
        all with the same token count and this cache's dtype (bit-exact round trip, no silent casts).
        """
        self._check_seq(seq)
        if not 0 <= at <= self._lens[seq]:
            raise TPAError(f"import_: position {at} would leave a gap after the {self._lens[seq]} tokens "
                           f"of sequence {seq}")
        expected = {f"layers.{i}.{name}" for i in range(self.config.n_layers) for name in self.names}
        if set(tensors) != expected:
            missing = sorted(expected - set(tensors))[:3]
            extra = sorted(set(tensors) - expected)[:3]
            raise TPAError(f"import_: the tensors do not match this cache's layout (missing {missing}, "
                           f"unexpected {extra})")
        count = None
        for key, value in tensors.items():
            name = key.rsplit(".", 1)[1]
            if tuple(value.shape[1:]) != self.shapes[name] or value.dim() != 1 + len(self.shapes[name]):
                raise TPAError(f"import_: {key} has shape {tuple(value.shape)}, expected [T, "
                               f"{', '.join(map(str, self.shapes[name]))}]")
            if value.dtype != self.dtype:
                raise TPAError(f"import_: {key} has dtype {value.dtype}, the cache holds {self.dtype}")
            if count is None:
                count = value.shape[0]
            elif value.shape[0] != count:
                raise TPAError(f"import_: {key} has {value.shape[0]} tokens, others have {count}")
        count = count or 0
        self.reserve(at + count)
        for key, value in tensors.items():
            _, i, name = key.split(".")
            self.storage[name][int(i), seq, at:at + count].copy_(value)
        self._set_length(seq, at + count)
        return at + count

    # ----- helpers ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _set_length(self, seq: int, length: int) -> None:
        self._lens[seq] = length
        self.lengths[seq] = length

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.batch_size:
            raise TPAError(f"sequence {seq} outside the cache's batch of {self.batch_size}")
