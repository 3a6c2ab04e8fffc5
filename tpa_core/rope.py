"""Rotary position embeddings: inverse frequencies with the Llama-family scalings, tables, and apply.

Both conventions rotate the pairs (i, i + D/2) of the head dimension:

- "rotate_half" (Hugging Face): y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin (rotation by +theta);
- "t6" (official T6 code): y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos (rotation by -theta).

So "t6" is "rotate_half" with sin negated; the tables carry the sign and `apply_rope` is one code path.
RoPE applies to B_Q/B_K (or q) only, never to A factors or B_V (the TPA paper's Theorem 3.1; docs/kernels.md).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from tpa_core.config import TPAConfig
from tpa_core.errors import TPAError


class RopeTables(NamedTuple):
    """cos and signed sin for a batch of positions, each `[B, N, 1, D]` (broadcast over heads/ranks)."""

    cos: Tensor
    sin: Tensor


def inv_freq(config: TPAConfig, seq_len: int | None = None, device: torch.device | str | None = None
             ) -> tuple[Tensor, float]:
    """Inverse frequencies `[D/2]` (float32) and the attention factor multiplying cos/sin (yarn; else 1.0).

    `seq_len` matters only for dynamic NTK scaling: the longest position + 1 the current call covers.
    Mirrors transformers' `modeling_rope_utils` so converted models match their originals.
    """
    dim = config.head_dim
    base = config.rope_theta
    scaling = config.rope_scaling
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    if scaling is None:
        return 1.0 / (base ** exponents), 1.0
    rope_type = scaling["rope_type"]
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return 1.0 / (base ** exponents) / factor, 1.0
    if rope_type == "dynamic":
        original = scaling["original_max_position_embeddings"]
        length = max(seq_len or original, original)
        base = base * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponents), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(1.0 / (base ** exponents), scaling), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(base, dim, exponents, scaling)
    raise AssertionError(f"rope_type {rope_type!r} passed TPAConfig validation")  # pragma: no cover


def _llama3_inv_freq(freq: Tensor, scaling: dict) -> Tensor:
    """Llama 3.1 scaling: low frequencies divided by `factor`, high ones kept, a smooth blend in between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn_inv_freq(base: float, dim: int, exponents: Tensor, scaling: dict) -> tuple[Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, linear ramp between; cos/sin scaled by mscale."""
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp would divide by zero
    pos_freqs = base ** exponents
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=pos_freqs.device) - low) / (high - low),
                       0, 1)
    extrapolation = 1 - ramp
    freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return freq, float(attention_factor)


class Rope:
    """RoPE for one model: `tables(positions)` once per forward, `apply_rope(x, tables)` per factor."""

    def __init__(self, config: TPAConfig) -> None:
        self.config = config
        self.dynamic = config.rope_scaling is not None and config.rope_scaling["rope_type"] == "dynamic"
        # Built on the CPU (also under a meta-device context) and moved to the positions' device on first use.
        self._inv_freq, self._attention_factor = inv_freq(config, device="cpu")
        self._sign = -1.0 if config.rope_style == "t6" else 1.0

    def tables(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> RopeTables:
        """cos and signed sin `[B, N, 1, D]` for integer `positions` `[B, N]`, in `dtype`."""
        freq = self._inv_freq
        if freq.device != positions.device:
            freq = self._inv_freq = freq.to(positions.device)
        if self.dynamic:
            freq, _ = inv_freq(self.config, seq_len=int(positions.max()) + 1, device=positions.device)
        angles = positions[..., None].to(torch.float32) * freq  # [B, N, D/2]
        cos, sin = angles.cos(), angles.sin()
        if self._attention_factor != 1.0:
            cos, sin = cos * self._attention_factor, sin * self._attention_factor
        if self.config.rope_tables_bf16:  # the official T6 code keeps its tables in bfloat16
            cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
        # rotate_half pairs (i, i + D/2): first half gets -x2 sin, second half +x1 sin (signs flip for t6)
        cos = torch.cat((cos, cos), dim=-1)  # [B, N, D]
        sin = torch.cat((-self._sign * sin, self._sign * sin), dim=-1)  # [B, N, D]
        return RopeTables(cos[:, :, None, :].to(dtype), sin[:, :, None, :].to(dtype))  # [B, N, 1, D]

    def shift(self, x: Tensor, offset: int) -> Tensor:
        """Move RoPE-rotated `x` `[T, K, D]` (a cached B_K) by `offset` positions (negative: back).

        Exact up to rounding: rotations compose, R(p + offset) = R(offset) R(p), and a YaRN attention factor
        already applied at p is not applied again. Dynamic NTK scaling picks its frequencies per call from the
        longest position, so a cached factor cannot be moved: that raises `TPAError`."""
        if self.dynamic:
            raise TPAError("dynamic NTK RoPE scaling changes its frequencies with the context length; "
                           "a cached key cannot be moved to another position (turn chunk reuse off)")
        if offset == 0:
            return x
        freq = self._inv_freq.to(device=x.device, dtype=torch.float64)
        angles = float(offset) * freq  # [D/2], float64 so the move adds no rounding of its own
        cos, sin = angles.cos(), angles.sin()
        cos = torch.cat((cos, cos))  # [D]
        sin = torch.cat((-self._sign * sin, self._sign * sin))  # [D]
        half = x.shape[-1] // 2
        wide = x.to(torch.float64)
        swapped = torch.cat((wide[..., half:], wide[..., :half]), dim=-1)  # [T, K, D]: (x2, x1)
        return (wide * cos + swapped * sin).to(x.dtype)


def apply_rope(x: Tensor, tables: RopeTables) -> Tensor:
    """Rotate `x` `[B, N, K, D]` (K heads or ranks) by `tables` (`[B, N, 1, D]`); returns a new tensor."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # [B, N, K, D]: (x2, x1)
    return torch.addcmul(x * tables.cos, swapped, tables.sin)
