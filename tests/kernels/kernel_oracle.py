"""A float64 oracle for attention in factor space: materialise Q, K, V per head and loop over sequences.

Deliberately the plainest possible code (no SDPA, no factor-space tricks) so the reference and the kernels
are checked against the definition (docs/kernels.md, "The math"), not against themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashtpa.inputs import AttentionInputs


def oracle_attention(x: AttentionInputs, scale: float | None = None) -> Tensor:
    """[B, N, H, D] float64 attention output (the contract of `flashtpa.dispatch.attention`)."""
    q, aq, bq, ak, bk, av, bv, kv_lens = x.q, x.aq, x.bq, x.ak, x.bk, x.av, x.bv, x.kv_lens
    f = torch.float64
    B, T_cap, R_K, D = bk.shape
    R_V = bv.shape[2]
    if q is not None:
        Q = q.to(f).cpu()  # [B, N, H, D]
    else:
        Q = torch.einsum("bnhr,bnrd->bnhd", aq.to(f).cpu(), bq.to(f).cpu()) / aq.shape[-1]  # [B, N, H, D]
    N, H = Q.shape[1], Q.shape[2]
    bk, bv = bk.to(f).cpu(), bv.to(f).cpu()
    if ak is not None:
        K = torch.einsum("bthr,btrd->bthd", ak.to(f).cpu(), bk) / R_K  # [B, T_cap, H, D]
        V = torch.einsum("bthr,btrd->bthd", av.to(f).cpu(), bv) / R_V  # [B, T_cap, H, D]
    else:
        group = torch.arange(H) // (H // R_K)  # head -> group
        K, V = bk[:, :, group], bv[:, :, group]  # [B, T_cap, H, D]
    scale = D ** -0.5 if scale is None else scale
    out = torch.empty(B, N, H, D, dtype=f)
    for b in range(B):
        L = int(kv_lens[b])
        for n in range(N):
            p = L - N + n
            s = torch.einsum("hd,thd->ht", Q[b, n], K[b, : p + 1]) * scale  # [H, p+1]
            w = torch.softmax(s, dim=-1)
            out[b, n] = torch.einsum("ht,thd->hd", w, V[b, : p + 1])
    return out
