"""Small launch-size helpers shared by the Triton launchers."""

from __future__ import annotations

# Shared memory the software pipeliner may fill with bk/bv blocks (an H200 SM has 228 KB; leave room for the rest).
PIPELINE_SMEM_BUDGET = 160 * 1024


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (x - 1).bit_length())


def fit_block_t(block_t: int, n_rank_tiles: int, head_dim: int, elem_size: int, num_stages: int) -> int:
    """Halve the token block until the pipelined bk/bv tiles (one per rank, per stage) fit in shared memory.

    Triton stages every load that feeds tl.dot through shared memory, so the footprint is
    n_rank_tiles * block_t * head_dim * elem_size * num_stages; high ranks (R = 16) or float32 need smaller blocks.
    """
    while block_t > 16 and n_rank_tiles * block_t * head_dim * elem_size * num_stages > PIPELINE_SMEM_BUDGET:
        block_t //= 2
    return block_t
