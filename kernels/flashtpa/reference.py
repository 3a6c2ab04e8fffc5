"""Pure-torch attention in TPA factor space: the oracle for the Triton kernels and the CPU path.

Math (the TPA paper's factorisation, docs/kernels.md), per sequence b, query n at position p = kv_lens[b] - N + n:
    Q_h = (1/R_Q) sum_r aq[h, r] bq[r]          (or the full query q[h])
    K_h(t) = (1/R_K) sum_r ak[t, h, r] bk[t, r]  V_h(t) = (1/R_V) sum_r av[t, h, r] bv[t, r]
    out_h = softmax_t<=p(scale * Q_h . K_h(t)) V_h(t)
Fixed head factors (ak = av = None) are grouped-query attention with G = R_K groups: head h reads bk[:, :, h // (H/G)].

Three paths, chosen by cost:
- fixed head factors: torch SDPA over the GQA cache, group heads stacked as query rows (no K/V expansion);
- contextual K/V with few queries (decode, short extend): scores and outputs contracted in factor space, never
  materialising the [T, H, D] keys or values;
- contextual K/V with many queries (prefill): K and V are built once ([B, H, T, D], cheap next to N*T attention)
  and handed to SDPA, whose fused kernel keeps memory linear in N.
All arithmetic runs in float32 (float64 stays float64); the result has the dtype of the queries (q, or bq),
which a cache in a narrower dtype (bk, bv) does not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flashtpa.inputs import AttentionInputs, AttentionShape, check_lengths

# Above this many new tokens per sequence, contextual K/V are materialised for SDPA (prefill); below, factor space.
FACTOR_SPACE_MAX_QUERIES = 16
# Largest score tensor (elements) the factor-space path builds at once; longer queries are processed in chunks.
FACTOR_SPACE_CHUNK_ELEMENTS = 1 << 23


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _allowed_mask(kv_lens: Tensor, N: int, T: int) -> Tensor:
    """Causal mask with a cache offset: [B, N, T] bool, True where query n of sequence b may read position t."""
    pos = kv_lens.to(torch.int64)[:, None] - N + torch.arange(N, device=kv_lens.device)  # [B, N]
    t = torch.arange(T, device=kv_lens.device)  # [T]
    return t[None, None, :] <= pos[:, :, None]  # [B, N, T]


def _full_queries(aq: Tensor, bq: Tensor, dtype: torch.dtype) -> Tensor:
    """Q = A_Q B_Q / R_Q: [B, N, H, R_Q] x [B, N, R_Q, D] -> [B, N, H, D]."""
    return torch.matmul(aq.to(dtype), bq.to(dtype)) / aq.shape[-1]


def _fixed_head_attention(
    q: Tensor, bk: Tensor, bv: Tensor, kv_lens: Tensor, lens: list[int], scale: float, dtype: torch.dtype
) -> Tensor:
    """Grouped-query attention over the ordinary GQA cache.

    q [B, N, H, D]; bk, bv [B, T, G, D] (already sliced to the longest length) -> [B, N, H, D].
    The H/G heads of a group become H/G * N query rows of one SDPA head, so no key or value is repeated.
    """
    B, N, H, D = q.shape
    T, G = bk.shape[1], bk.shape[2]
    Hg = H // G
    k = bk.to(dtype).transpose(1, 2)  # [B, G, T, D]
    v = bv.to(dtype).transpose(1, 2)  # [B, G, T, D]
    equal = all(n_b == T for n_b in lens)
    if N == 1:
        qg = q.to(dtype).reshape(B, G, Hg, D)  # [B, G, Hg*N, D] with N = 1: rows are the group's heads
        mask = None if equal else _allowed_mask(kv_lens, 1, T)[:, None]  # [B, 1, 1, T]
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [B, G, Hg, D]
        return out.reshape(B, 1, H, D)
    if equal and N == T:
        # Plain causal prefill: SDPA's own causal path, heads grouped by enable_gqa.
        qh = q.to(dtype).transpose(1, 2)  # [B, H, N, D]
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=G != H)  # [B, H, N, D]
        return out.transpose(1, 2)  # [B, N, H, D]
    qg = q.to(dtype).reshape(B, N, G, Hg, D).permute(0, 2, 3, 1, 4).reshape(B, G, Hg * N, D)  # rows (head, n)
    allowed = _allowed_mask(kv_lens, N, T)  # [B, N, T]
    mask = allowed[:, None, None].expand(B, 1, Hg, N, T).reshape(B, 1, Hg * N, T)  # [B, 1, Hg*N, T]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [B, G, Hg*N, D]
    return out.reshape(B, G, Hg, N, D).permute(0, 3, 1, 2, 4).reshape(B, N, H, D)


def _factor_space_chunk(
    q: Tensor | None,
    aq: Tensor | None,
    bq: Tensor | None,
    ak: Tensor,
    bk: Tensor,
    av: Tensor,
    bv: Tensor,
    allowed: Tensor | None,
    scale: float,
) -> Tensor:
    """Contextual K/V in factor space for a chunk of n queries (all tensors already in the compute dtype).

    q [B, n, H, D] or aq [B, n, H, R_Q] + bq [B, n, R_Q, D]; ak [B, T, H, R_K]; bk [B, T, R_K, D];
    av [B, T, H, R_V]; bv [B, T, R_V, D]; allowed [B, n, T] or None -> [B, n, H, D].
    """
    B, T, R_K, D = bk.shape
    H, R_V = av.shape[2], av.shape[3]
    n = q.shape[1] if q is not None else bq.shape[1]
    kb = bk.reshape(B, T * R_K, D)  # [B, T*R_K, D]
    if q is not None:
        # KV-only: q_h . bk[t, r] for every head and rank.
        u = torch.matmul(q.reshape(B, n * H, D), kb.transpose(1, 2))  # [B, n*H, T*R_K]
        u = u.view(B, n, H, T, R_K)
        c = scale / R_K
    else:
        R_Q = bq.shape[2]
        # S1 = bq . bk shared by all heads, then mixed by aq: cost R_Q (D + H) per (t, r) instead of H D.
        s1 = torch.matmul(bq.reshape(B, n * R_Q, D), kb.transpose(1, 2))  # [B, n*R_Q, T*R_K]
        u = torch.matmul(aq, s1.view(B, n, R_Q, T * R_K))  # [B, n, H, T*R_K]
        u = u.view(B, n, H, T, R_K)
        c = scale / (R_Q * R_K)
    akh = ak.permute(0, 2, 1, 3).unsqueeze(1)  # [B, 1, H, T, R_K]
    scores = (u * akh).sum(-1) * c  # [B, n, H, T]
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, :, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)  # [B, n, H, T]
    w = p.unsqueeze(-1) * av.permute(0, 2, 1, 3).unsqueeze(1)  # [B, n, H, T, R_V]
    out = torch.matmul(w.reshape(B, n * H, T * R_V), bv.reshape(B, T * R_V, D))  # [B, n*H, D]
    return out.view(B, n, H, D) / R_V


def _factor_space_attention(
    q: Tensor | None,
    aq: Tensor | None,
    bq: Tensor | None,
    ak: Tensor,
    bk: Tensor,
    av: Tensor,
    bv: Tensor,
    kv_lens: Tensor,
    lens: list[int],
    shape: AttentionShape,
    scale: float,
    dtype: torch.dtype,
) -> Tensor:
    """Contextual / KV-only attention without materialised K or V; queries in chunks bounding the score memory."""
    N, H, T = shape.N, shape.H, bk.shape[1]
    if q is not None:
        q = q.to(dtype)
    else:
        aq, bq = aq.to(dtype), bq.to(dtype)
        if shape.R_Q * (shape.D + H) >= H * shape.D:
            q, aq, bq = _full_queries(aq, bq, dtype), None, None  # Q itself is the cheaper contraction
    ak, bk, av, bv = ak.to(dtype), bk.to(dtype), av.to(dtype), bv.to(dtype)
    equal = all(n_b == T for n_b in lens)
    allowed = None if (N == 1 and equal) else _allowed_mask(kv_lens, N, T)  # [B, N, T]
    step = max(1, FACTOR_SPACE_CHUNK_ELEMENTS // (shape.B * H * T * max(shape.R_K, shape.R_V)))
    outs = []
    for s in range(0, N, step):
        e = min(N, s + step)
        outs.append(
            _factor_space_chunk(
                q[:, s:e] if q is not None else None,
                aq[:, s:e] if aq is not None else None,
                bq[:, s:e] if bq is not None else None,
                ak,
                bk,
                av,
                bv,
                allowed[:, s:e] if allowed is not None else None,
                scale,
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _materialised_attention(
    q: Tensor, ak: Tensor, bk: Tensor, av: Tensor, bv: Tensor, kv_lens: Tensor, lens: list[int], scale: float,
    dtype: torch.dtype,
) -> Tensor:
    """Prefill: build K, V [B, H, T, D] once from the factors and run SDPA (q [B, N, H, D] -> [B, N, H, D])."""
    B, N, H, D = q.shape
    T, R_K, R_V = bk.shape[1], bk.shape[2], bv.shape[2]
    k = torch.matmul(ak.to(dtype), bk.to(dtype)) / R_K  # [B, T, H, R_K] x [B, T, R_K, D] -> [B, T, H, D]
    v = torch.matmul(av.to(dtype), bv.to(dtype)) / R_V  # [B, T, H, D]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, *, D]
    if N == T and all(n_b == T for n_b in lens):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        mask = _allowed_mask(kv_lens, N, T)[:, None]  # [B, 1, N, T]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)  # [B, N, H, D]


def attention_reference(x: AttentionInputs, scale: float | None = None) -> Tensor:
    """Attention in factor space with torch ops (same contract as `flashtpa.dispatch.attention`).

    Args:
        x: the call's tensors (shapes in `AttentionInputs`).
        scale: logit scale, default 1/sqrt(D).

    Returns:
        [B, N, H, D] in the dtype of the queries.

    Raises:
        AttentionInputError: shapes, devices or lengths that do not fit the contract.
    """
    shape = x.check()
    q, aq, bq, ak, bk, av, bv, kv_lens = x.q, x.aq, x.bq, x.ak, x.bk, x.av, x.bv, x.kv_lens
    out_dtype = (q if q is not None else bq).dtype
    lens = kv_lens.tolist()
    check_lengths(lens, shape.N, shape.T_cap)
    T = max(lens)
    scale = shape.D ** -0.5 if scale is None else float(scale)
    dtype = _compute_dtype(bk.dtype)
    bk, bv = bk[:, :T], bv[:, :T]  # positions past the longest sequence are never read
    if shape.contextual:
        ak, av = ak[:, :T], av[:, :T]
    if any(n_b != T for n_b in lens):
        # A shorter sequence's tail inside [0, T) is garbage (possibly NaN): zero it, since a masked score
        # still multiplies its value (0 * NaN = NaN). Only batches of unequal lengths pay for this copy.
        valid = (torch.arange(T, device=bk.device)[None, :] < kv_lens[:, None])[:, :, None, None]  # [B, T, 1, 1]
        bk, bv = bk.where(valid, 0), bv.where(valid, 0)
        if shape.contextual:
            ak, av = ak.where(valid, 0), av.where(valid, 0)
    if not shape.contextual:
        if q is None:
            q = _full_queries(aq, bq, dtype)
        out = _fixed_head_attention(q, bk, bv, kv_lens, lens, scale, dtype)
    else:
        if shape.N <= FACTOR_SPACE_MAX_QUERIES:
            out = _factor_space_attention(q, aq, bq, ak, bk, av, bv, kv_lens, lens, shape, scale, dtype)
        else:
            if q is None:
                q = _full_queries(aq, bq, dtype)
            out = _materialised_attention(q.to(dtype), ak, bk, av, bv, kv_lens, lens, scale, dtype)
    return out.to(out_dtype)
