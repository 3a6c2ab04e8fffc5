"""FlashTPA decode launcher: one new token per sequence, the cache split into slices across programs.

`DecodeConfig` holds every launch parameter; `default_decode_config` picks it for a call's shapes and device (the
production path, `flashtpa.triton_attention`, always takes the default); `decode_attention` launches the split
kernel and the merge (`flashtpa.jit.decode`). Lengths are read on the device, never compiled in: the grid follows
the buffer capacity, so a decode loop keeps one compiled kernel and one CUDA graph (docs/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from flashtpa._launch import (
    LOG2E,
    TMA_MAX_ROW_BYTES,
    default_tma,
    fit_block_t,
    multiprocessors,
    next_pow2,
    pdl_supported,
    token_descriptors,
)
from flashtpa.inputs import AttentionInputs
from flashtpa.jit.decode import _decode_factor_kernel, _decode_gqa_kernel, _decode_merge_kernel

MIN_CHUNK = 64  # fewest tokens a slice in use holds, so that short caches still spread over many programs


@dataclass(frozen=True)
class DecodeConfig:
    """The launch parameters of one decode call.

    num_splits: slices of each sequence's cache in the grid (a sequence uses those its runtime length fills).
    min_chunk: fewest tokens per slice in use.
    block_t: tokens per block of the key loop.
    head_tile: query rows per program, a power of two >= 16: heads of a tile (contextual / KV-only; several tiles
        when it is below H) or the padded heads of a group (fixed head factors, where nothing else is possible).
    num_warps, num_stages: Triton's launch options for the split kernel.
    prefetch: rank-1 head factors load one block ahead (contextual / KV-only); else each rank loads in its block.
    pdl: the merge is a programmatic dependent launch of the split kernel (Hopper and later).
    tma: whole blocks of bk / bv load through TMA descriptors (Hopper and later).
    """

    num_splits: int
    min_chunk: int
    block_t: int
    head_tile: int
    num_warps: int
    num_stages: int
    prefetch: bool
    pdl: bool
    tma: bool


def split_count(device: torch.device, programs_per_split: int, T_cap: int, min_chunk: int, waves: int,
                round_down: bool = False) -> int:
    """Slices in the grid: `waves` programs per SM (latency hiding), never more than the capacity can fill.

    Depends on the capacity and the batch, not the length, so a decode loop keeps one grid (and one CUDA graph)
    until the cache doubles. `round_down` keeps the grid within `waves` programs per SM (rounding up can start a
    nearly empty extra round of programs, each as long as the others), then takes the power of two below where
    that drops at most 1/32 of the slices: the merge then pads nothing (benchmarks/NOTES.md, "Decode grid").
    """
    programs = waves * multiprocessors(device)
    per_seq = programs // programs_per_split if round_down else triton.cdiv(programs, programs_per_split)
    splits = max(1, min(per_seq, triton.cdiv(T_cap, min_chunk), 1024))
    pow2 = 1 << (splits.bit_length() - 1)
    if round_down and pow2 * 32 >= splits * 31:
        splits = pow2
    return splits


def default_decode_config(x: AttentionInputs, *, min_chunk: int = MIN_CHUNK, head_tile: int | None = None,
                          waves: int | None = None) -> DecodeConfig:
    """The launch parameters for these inputs on their device (tuned on an H200: benchmarks/NOTES.md).

    `min_chunk`, `head_tile` (heads per program wanted) and `waves` (programs per SM) are the choices the other
    parameters follow from; left alone they take the defaults. Rank-1 factors stream best in 128-token blocks;
    higher ranks hold head-factor tiles in registers (32-token blocks at 64 heads a program, 64 at <= 32); GQA
    takes 32-token blocks at D = 128 and 64 at D = 64.
    """
    bk, bv = x.bk, x.bv
    B, T_cap, R_K, D = bk.shape
    R_V = bv.shape[2]
    fixed = x.ak is None
    H = x.q.shape[2] if x.q is not None else x.aq.shape[2]
    rank_one = not fixed and R_K == 1 and R_V == 1
    if fixed:
        n_groups, n_head_tiles = R_K, 1
        tile = max(16, next_pow2(H // n_groups))
    else:
        if head_tile is None:
            # all heads in one program (bk/bv read once) up to 64; above, tiles of 32 (H = 78 pads to 96, not 128)
            head_tile = H if rank_one or H <= 64 else 32
        n_groups = 1
        tile = min(max(16, next_pow2(head_tile)), max(16, next_pow2(H)))
        n_head_tiles = triton.cdiv(H, tile)
    if rank_one:
        block_t = 128
    elif fixed:
        block_t = 32 if D >= 128 else 64
    else:
        block_t = 64 if tile <= 32 else 32
    num_stages = 3
    block_t = fit_block_t(block_t, 2 if fixed else R_K + R_V, D, bk.element_size(), num_stages)
    if waves is None:
        # GQA at D <= 64 with many (sequence, group) pairs fills 4 programs per SM; the factor kernel's registers
        # allow 2 (benchmarks/NOTES.md, "Launch variants")
        waves = (4 if D <= 64 and B * n_groups >= 32 else 2) if fixed else 2
    num_splits = split_count(bk.device, B * n_groups * n_head_tiles, T_cap, min_chunk, waves, round_down=not fixed)
    return DecodeConfig(
        num_splits=num_splits,
        min_chunk=min_chunk,
        block_t=block_t,
        head_tile=tile,
        num_warps=8 if tile >= 128 else 4,
        num_stages=num_stages,
        # at 128 heads a program the prefetched tiles cost more registers than they save
        prefetch=rank_one and tile <= 64,
        # PDL pays after the factor kernel and costs after the GQA kernel (benchmarks/NOTES.md, "PDL")
        pdl=not fixed and pdl_supported(bk.device),
        # TMA pays for GQA at any head dim and for rank-1 factors, not for higher ranks (benchmarks/NOTES.md, "TMA")
        tma=default_tma(bk, bv, pays=fixed or rank_one, max_row_bytes=None if fixed else TMA_MAX_ROW_BYTES),
    )


def merge_tile(num_splits: int, head_dim: int) -> tuple[int, int]:
    """(S_PAD, BLOCK_D) of the merge: all slices in one tile of at most 4,096 float32 (32 registers a thread)."""
    s_pad = max(16, next_pow2(num_splits))
    return s_pad, max(1, min(head_dim, 4096 // s_pad))


def _check_config(config: DecodeConfig, x: AttentionInputs, H: int, fixed: bool, rank_one: bool) -> None:
    if config.head_tile < 16 or config.head_tile & (config.head_tile - 1):
        raise ValueError(f"head_tile must be a power of two >= 16, got {config.head_tile}")
    if fixed and config.head_tile != max(16, next_pow2(H // x.bk.shape[2])):
        raise ValueError("with fixed head factors head_tile is the group's heads padded to a power of two >= 16")
    if config.prefetch and not rank_one:
        raise ValueError("prefetch applies to rank-1 head factors only (contextual / KV-only, R_K = R_V = 1)")
    if config.pdl and not pdl_supported(x.bk.device):
        raise ValueError(f"pdl=True needs a Hopper or later GPU and a Triton with grid dependency control, "
                         f"not {x.bk.device}")
    if config.num_splits < 1 or config.min_chunk < 1:
        raise ValueError(f"num_splits and min_chunk must be positive, got {config.num_splits}, {config.min_chunk}")


def decode_attention(x: AttentionInputs, scale: float, config: DecodeConfig | None = None) -> Tensor:
    """FlashTPA decode (inputs already validated by `flashtpa.triton_attention`): q or (aq, bq) hold N = 1.

    Args:
        x: the call's tensors (shapes in `AttentionInputs`); kv_lens is read on the device (no synchronisation).
        scale: the logit scale.
        config: launch parameters; default `default_decode_config(x)`.

    Returns:
        [B, 1, H, D] in the dtype of bk.

    Raises:
        ValueError: a config that does not fit these inputs or this device.
    """
    bk, bv, kv_lens = x.bk, x.bv, x.kv_lens
    q, aq, bq, ak, av = x.q, x.aq, x.bq, x.ak, x.av
    B, T_cap, R_K, D = bk.shape
    R_V = bv.shape[2]
    fixed = ak is None
    H = q.shape[2] if q is not None else aq.shape[2]
    rank_one = not fixed and R_K == 1 and R_V == 1
    cfg = default_decode_config(x) if config is None else config
    _check_config(cfg, x, H, fixed, rank_one)
    n_groups = R_K if fixed else 1
    n_head_tiles = 1 if fixed else triton.cdiv(H, cfg.head_tile)
    num_splits, dev = cfg.num_splits, bk.device
    part_o = torch.empty(B, H, num_splits, D, device=dev, dtype=torch.float32)  # [B, H, S, D]
    part_lse = torch.empty(B, H, num_splits, device=dev, dtype=torch.float32)  # [B, H, S]
    out = torch.empty(B, 1, H, D, device=dev, dtype=bk.dtype)
    ieee = bk.dtype == torch.float32
    bk_desc, bv_desc = token_descriptors(bk, bv, cfg.block_t, cfg.tma)
    if fixed:
        _decode_gqa_kernel[(B * n_groups, num_splits)](
            q, bk, bv, bk_desc, bv_desc, kv_lens, part_o, part_lse,
            q.stride(0), q.stride(2),
            bk.stride(0), bk.stride(1), bk.stride(2),
            bv.stride(0), bv.stride(1), bv.stride(2),
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            T_cap, H // n_groups, n_groups, num_splits, cfg.min_chunk, scale * LOG2E,
            HEAD_DIM=D, H_PAD=cfg.head_tile, BLOCK_T=cfg.block_t, IEEE=ieee, PDL=cfg.pdl, TMA=cfg.tma,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        R_Q = aq.shape[3] if aq is not None else 1
        dummy = bk  # the unused query pointers (Q_FACTORS keeps them unread)
        # Head tiles vary fastest in the grid, so the programs re-reading one slice's bk/bv run together (L2).
        _decode_factor_kernel[(n_head_tiles, B, num_splits)](
            q if q is not None else dummy, aq if aq is not None else dummy, bq if bq is not None else dummy,
            ak, bk, av, bv, bk_desc, bv_desc, kv_lens, part_o, part_lse,
            q.stride(0) if q is not None else 0, q.stride(2) if q is not None else 0,
            aq.stride(0) if aq is not None else 0, aq.stride(2) if aq is not None else 0,
            bq.stride(0) if bq is not None else 0, bq.stride(2) if bq is not None else 0,
            ak.stride(0), ak.stride(1), ak.stride(2),
            bk.stride(0), bk.stride(1), bk.stride(2),
            av.stride(0), av.stride(1), av.stride(2),
            bv.stride(0), bv.stride(1), bv.stride(2),
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            T_cap, H, num_splits, cfg.min_chunk, scale * LOG2E / R_K,
            R_Q=R_Q, RQ_PAD=max(16, next_pow2(R_Q)), R_K=R_K, R_V=R_V, HEAD_DIM=D, HEAD_TILE=cfg.head_tile,
            BLOCK_T=cfg.block_t, Q_FACTORS=q is None, PREFETCH=cfg.prefetch, IEEE=ieee, PDL=cfg.pdl, TMA=cfg.tma,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    s_pad, block_d = merge_tile(num_splits, D)
    _decode_merge_kernel[(B, H, D // block_d)](
        part_o, part_lse, out,
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(2),
        num_splits, 1.0 if fixed else 1.0 / R_V,
        S_PAD=s_pad, BLOCK_D=block_d, PDL=cfg.pdl,
        num_warps=4, **({"launch_pdl": True} if cfg.pdl else {}),  # older Tritons know no launch_pdl option
    )
    return out
