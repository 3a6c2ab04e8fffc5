"""Assemble a factor cache from separately encoded chunks, then recompute chosen tokens against it.

A chunk encoded once at a reference position can sit anywhere: RoPE is on B_K only, so `place` moves it by
rotating B_K (`Rope.shift`) and leaves the head factors and B_V alone. What a moved chunk lacks is attention to
the chunks before it; `recompute` repairs chosen tokens - the first tokens of each chunk (EPIC's boundary
recompute) or the tokens whose factors deviate most (CacheBlend's selection, `select_deviating`) - by running
them through every layer again, each reading the whole assembled cache up to its own position. Recomputing every
token is a full prefill (the same logits to float32 rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tpa_core.attention import StepInfo
from tpa_core.cache import FactorCache
from tpa_core.errors import TPAError
from tpa_core.model import TPAModel, residual_dtype


def place(model: TPAModel, tensors: dict[str, Tensor], offset: int) -> dict[str, Tensor]:
    """A chunk's export dict (`layers.{i}.{name} -> [T, ...]`) moved by `offset` positions: B_K rotated, the
    rest as is. Returns a new dict in the model's cache dtype."""
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        value = value.to(model.cache_dtype)
        out[key] = model.rope.shift(value, offset) if key.endswith(".bk") else value  # bk: [T, R_K, D]
    return out


@torch.inference_mode()
def recompute(model: TPAModel, cache: FactorCache, token_ids: Sequence[int], positions: Sequence[int],
              seq: int = 0, *, first_layer_states: Tensor | None = None) -> None:
    """Recompute the factors of the tokens at `positions` (ascending, all below the sequence's length) in every
    layer, each token attending to the cache up to and including its own position.

    `token_ids[j]` is the token at `positions[j]`. Other positions keep what the cache holds. Per layer, the
    chosen tokens' new factors are written first and then read, so a chosen token sees the chosen tokens before
    it at their recomputed values, as a prefill would. `first_layer_states`: the residual stream `[1, S, d]` of
    these tokens after layer 0, when `select_deviating` computed it already (layer 0 is then skipped)."""
    if len(positions) != len(token_ids):
        raise TPAError(f"recompute: {len(token_ids)} token ids for {len(positions)} positions")
    if not positions:
        return
    length = cache.length(seq)
    pos = torch.tensor(list(positions), dtype=torch.long, device=cache.device)  # [S]
    if bool((pos[1:] <= pos[:-1]).any()) or int(pos[0]) < 0 or int(pos[-1]) >= length:
        raise TPAError(f"recompute: positions must be ascending and inside the {length} cached tokens")
    tables = model.rope.tables(pos[None], model.dtype)  # [1, S, 1, D]
    # Each chosen token is a batch row of one query over the shared buffers (expanded, not copied).
    step = StepInfo(rows=slice(seq, seq + 1), starts=[0], kv_lens=(pos + 1).to(torch.int32), rope=tables,
                    backend=model.attention_backend)
    if first_layer_states is None:
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=model.device)[None]  # [1, S]
        x = model.embed(ids).to(residual_dtype(model.dtype))  # [1, S, d]
        start = 0
    else:
        x, start = first_layer_states, 1
    for i in range(start, len(model.layers)):
        x = _layer(model, i, x, cache, seq, pos, step)


def _layer(model: TPAModel, i: int, x: Tensor, cache: FactorCache, seq: int, pos: Tensor, step: StepInfo) -> Tensor:
    """One block for the chosen tokens: x `[1, S, d]` -> `[1, S, d]`; writes their factors at `pos`."""
    block = model.layers[i]
    attn = block.attn
    S = pos.numel()
    f = attn.factors(block.attn_norm.forward(x), step.rope)  # name -> [1, S, ...]
    for name in cache.names:
        cache.storage[name][i, seq, pos] = f[name][0].to(cache.dtype)  # scatter the S tokens' factors to their places
    T = int(pos[-1]) + 1
    buf = {name: store[i, seq, :T] for name, store in cache.storage.items()}  # name -> [T, ...]
    out = _scattered_attention(f, buf, pos)  # [S, H, D]
    out = out.to(attn.w_o.dtype)
    out = out.reshape(1, S, attn.n_heads * attn.head_dim)  # [S, H, D] -> [1, S, H*D]
    x = x + attn.output(out)
    return x + block.mlp.forward(block.mlp_norm.forward(x))


def _scattered_attention(f: dict[str, Tensor], buf: dict[str, Tensor], pos: Tensor) -> Tensor:
    """Attention of S queries at positions `pos` `[S]` (ascending) over the cached factors `buf` (`[T, ...]`,
    T = pos[-1] + 1), each reading the keys at or before its own position: `[S, H, D]`.

    One SDPA call with a mask, on K and V built from the factors (the query rows are not contiguous positions,
    which the factor-space kernels assume). Computes in float32 at least."""
    dtype = torch.promote_types(f["bk"].dtype, torch.float32)
    if "q" in f:
        q = f["q"][0].to(dtype)  # [S, H, D]
    else:
        q = torch.matmul(f["aq"][0].to(dtype), f["bq"][0].to(dtype)) / f["aq"].shape[-1]  # [S, H, D]
    bk, bv = buf["bk"].to(dtype), buf["bv"].to(dtype)  # [T, R, D]
    if "ak" in buf:
        k = torch.matmul(buf["ak"].to(dtype), bk) / bk.shape[1]  # [T, H, R_K] x [T, R_K, D] -> [T, H, D]
        v = torch.matmul(buf["av"].to(dtype), bv) / bv.shape[1]  # [T, H, D]
    else:
        k, v = bk, bv  # fixed head factors: the G grouped heads, [T, G, D]
    T = k.shape[0]
    allowed = torch.arange(T, device=pos.device)[None, :] <= pos[:, None]  # [S, T]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],  # [1, H|G, S|T, D]
        attn_mask=allowed[None, None], enable_gqa=k.shape[1] != q.shape[1],
    )  # [1, H, S, D]
    return out[0].transpose(0, 1)  # [S, H, D]


@torch.inference_mode()
def select_deviating(model: TPAModel, cache: FactorCache, token_ids: Sequence[int], positions: Sequence[int],
                     ratio: float, seq: int = 0) -> tuple[list[int], Tensor | None]:
    """CacheBlend's selection: of the tokens at `positions`, the `ratio` share whose layer-1 key and value
    factors differ most from what the cache holds (after the first layer is recomputed for all of them).

    Returns (the chosen positions, ascending; their residual stream after layer 0 `[1, S, d]`, to pass to
    `recompute`). Layer 0's factors need no repair (they depend on the token and its position only); layer 1's
    are the first to see the other chunks."""
    if not 0 <= ratio <= 1:
        raise TPAError(f"the recompute ratio must be in [0, 1], got {ratio}")
    n_pick = int(round(ratio * len(positions)))
    if n_pick == 0 or len(model.layers) < 2:
        return [], None
    pos = torch.tensor(list(positions), dtype=torch.long, device=cache.device)  # [S]
    tables = model.rope.tables(pos[None], model.dtype)  # [1, S, 1, D]
    step = StepInfo(rows=slice(seq, seq + 1), starts=[0], kv_lens=(pos + 1).to(torch.int32), rope=tables,
                    backend=model.attention_backend)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=model.device)[None]  # [1, S]
    x = _layer(model, 0, model.embed(ids).to(residual_dtype(model.dtype)), cache, seq, pos, step)  # [1, S, d]
    block = model.layers[1]
    fresh = block.attn.factors(block.attn_norm.forward(x), tables)  # name -> [1, S, ...]
    deviation = torch.zeros(pos.numel(), dtype=torch.float32, device=cache.device)  # [S]
    for name in ("bk", "bv"):
        old = cache.storage[name][1, seq, pos].float()  # [S, R, D]
        deviation += (fresh[name][0].float() - old).pow(2).flatten(1).sum(1)  # [S]
    chosen = torch.topk(deviation, n_pick).indices.sort().values  # [n_pick], ascending
    return pos[chosen].tolist(), x[:, chosen]
