"""Multi-head latent attention (DeepSeek-V2), the baseline of the convergence comparison.

Per token x `[d]`, with H heads, a no-RoPE part of dim D_n, a RoPE part of dim D_r and value dim D_v:

    q = W_qb norm(W_qa x)                  [H, D_n + D_r]   (low-rank query, rank `q_lora_rank`)
    c, k_r = W_kva x                        [kv_lora_rank], [D_r]
    k_n, v = W_kvb norm(c)                  [H, D_n], [H, D_v]
    k = (k_n, RoPE(k_r) for every head),   q = (q_n, RoPE(q_r)),   scale 1/sqrt(D_n + D_r)

The decoupled RoPE key k_r is one vector shared by all heads, so the cache holds per token and layer only the
normalized latent `norm(c)` and the rotated `k_r`: (kv_lora_rank + D_r) numbers (`MLACache`). The model around it
(`MLAModel`) has the same blocks as `TPAModel` (pre-norm RMSNorm, SwiGLU, tied embedding) so that a comparison
differs only in the attention. It runs in this package only; the inference engine and the store do not know it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpa_core.config import TPAConfig
from tpa_core.errors import TPAError
from tpa_core.model import RMSNorm, SwiGLU
from tpa_core.rope import Rope, RopeTables, apply_rope


@dataclass(frozen=True)
class MLAConfig:
    """Shape of an MLA decoder; norms, MLP, RoPE convention and embedding tying follow the T6 model."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    mlp_hidden: int
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_dim",
                     "qk_rope_dim", "v_head_dim", "mlp_hidden", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TPAError(f"MLAConfig.{name} must be a positive integer, got {value!r}")
        if self.qk_rope_dim % 2:
            raise TPAError(f"MLAConfig.qk_rope_dim must be even for RoPE, got {self.qk_rope_dim}")

    def cache_bytes_per_token(self, element_size: int = 2) -> int:
        """Bytes of cache per token over all layers: the latent and the shared RoPE key."""
        return (self.kv_lora_rank + self.qk_rope_dim) * self.n_layers * element_size

    def rope_config(self) -> TPAConfig:
        """A TPAConfig that describes only the RoPE part (head dim D_r, T6 convention), for `tpa_core.rope`."""
        return TPAConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=1, n_heads=1,
                         head_dim=self.qk_rope_dim, k_rank=1, v_rank=1, mlp_hidden=1, rope_theta=self.rope_theta,
                         rope_style="t6", max_position_embeddings=self.max_position_embeddings)


class MLACache:
    """Per layer, the normalized latent `[B, T_cap, kv_lora_rank]` and the rotated shared key `[B, T_cap, D_r]`."""

    def __init__(self, config: MLAConfig, batch_size: int = 1, capacity: int = 256,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.config = config
        L = config.n_layers
        self.storage: dict[str, Tensor] = {
            "latent": torch.zeros(L, batch_size, capacity, config.kv_lora_rank, dtype=dtype, device=device),
            "k_rope": torch.zeros(L, batch_size, capacity, config.qk_rope_dim, dtype=dtype, device=device),
        }
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.storage["latent"].shape[2]

    def nbytes_per_token(self) -> int:
        """Bytes one token takes in this cache, all layers together."""
        return sum(t[:, 0, 0].numel() * t.element_size() for t in self.storage.values())

    def append(self, layer: int, latent: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """Write layer `layer`'s new `latent` `[B, N, C]` and `k_rope` `[B, N, D_r]` after the cached tokens;
        returns the layer's whole valid cache `[B, T, C]`, `[B, T, D_r]` (T = length + N)."""
        end = self.length + latent.shape[1]
        if end > self.capacity:
            raise TPAError(f"MLACache holds {self.capacity} tokens, {end} were asked for")
        self.storage["latent"][layer, :, self.length:end] = latent
        self.storage["k_rope"][layer, :, self.length:end] = k_rope
        return self.storage["latent"][layer, :, :end], self.storage["k_rope"][layer, :, :end]


class MLAAttention(nn.Module):
    """`attn(x [B, N, d], positions) -> [B, N, d]`; with `cache`/`layer`, appends to an `MLACache` first."""

    def __init__(self, config: MLAConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        c = config
        self.config = c
        H, Dn, Dr, Dv = c.n_heads, c.qk_nope_dim, c.qk_rope_dim, c.v_head_dim
        factory = {"device": device, "dtype": dtype}
        self.w_qa = nn.Parameter(torch.empty(c.q_lora_rank, c.d_model, **factory))  # [R_q, d]
        self.q_norm = RMSNorm(c.q_lora_rank, None, True, device, dtype)
        self.w_qb = nn.Parameter(torch.empty(H * (Dn + Dr), c.q_lora_rank, **factory))  # [H*(Dn+Dr), R_q]
        self.w_kva = nn.Parameter(torch.empty(c.kv_lora_rank + Dr, c.d_model, **factory))  # [C+Dr, d]
        self.kv_norm = RMSNorm(c.kv_lora_rank, None, True, device, dtype)
        self.w_kvb = nn.Parameter(torch.empty(H * (Dn + Dv), c.kv_lora_rank, **factory))  # [H*(Dn+Dv), C]
        self.w_o = nn.Parameter(torch.empty(c.d_model, H * Dv, **factory))  # [d, H*Dv]
        for weight in (self.w_qa, self.w_qb, self.w_kva, self.w_kvb, self.w_o):
            nn.init.normal_(weight, std=0.02)
        self.rope = Rope(c.rope_config())

    def forward(self, x: Tensor, positions: Tensor, cache: MLACache | None = None, layer: int = 0) -> Tensor:
        """x `[B, N, d]` at integer `positions` `[N]` -> `[B, N, d]`; causal over the cache and x."""
        c = self.config
        B, N, _ = x.shape
        H, Dn, Dr, Dv = c.n_heads, c.qk_nope_dim, c.qk_rope_dim, c.v_head_dim
        rope: RopeTables = self.rope.tables(positions.to(x.device).expand(B, N))  # [B, N, 1, Dr]
        q = F.linear(self.q_norm(F.linear(x, self.w_qa)), self.w_qb).view(B, N, H, Dn + Dr)  # [B, N, H, Dn+Dr]
        q_nope, q_rope = q.split((Dn, Dr), dim=-1)  # [B, N, H, Dn], [B, N, H, Dr]
        q = torch.cat((q_nope, apply_rope(q_rope, rope).to(q_nope.dtype)), dim=-1)  # [B, N, H, Dn+Dr]
        latent, k_rope = F.linear(x, self.w_kva).split((c.kv_lora_rank, Dr), dim=-1)  # [B, N, C], [B, N, Dr]
        latent = self.kv_norm(latent)  # [B, N, C]
        k_rope = apply_rope(k_rope.unsqueeze(2), rope).squeeze(2).to(latent.dtype)  # [B, N, Dr]
        if cache is not None:
            latent, k_rope = cache.append(layer, latent, k_rope)  # [B, T, C], [B, T, Dr]
        T = latent.shape[1]
        kv = F.linear(latent, self.w_kvb).view(B, T, H, Dn + Dv)  # [B, T, H, Dn+Dv]
        k_nope, v = kv.split((Dn, Dv), dim=-1)  # [B, T, H, Dn], [B, T, H, Dv]
        k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(B, T, H, Dr)), dim=-1)  # [B, T, H, Dn+Dr]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N or T, .]
        scale = 1.0 / math.sqrt(Dn + Dr)
        if T == N:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # [B, H, N, Dv]
        else:  # new tokens after a cached prefix: query n sits at T - N + n
            allowed = torch.arange(T, device=x.device) <= (T - N + torch.arange(N, device=x.device))[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)  # [B, H, N, Dv]
        out = out.transpose(1, 2).reshape(B, N, H * Dv)  # [B, H, N, Dv] -> [B, N, H*Dv]
        return F.linear(out, self.w_o)  # [B, N, d]


class MLABlock(nn.Module):
    """Pre-norm block with the attribute names of `tpa_core.model.Block` (attn_norm, attn, mlp_norm, mlp)."""

    def __init__(self, config: MLAConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, None, False, device, dtype)
        self.attn = MLAAttention(config, device, dtype)
        self.mlp_norm = RMSNorm(config.d_model, None, False, device, dtype)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden, device, dtype)


class MLAModel(nn.Module):
    """An MLA decoder laid out like `TPAModel` (embed, layers, norm, tied head), for training comparisons."""

    def __init__(self, config: MLAConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model, device=device, dtype=dtype)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.layers = nn.ModuleList(MLABlock(config, device, dtype) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, None, False, device, dtype)
        self.lm_head = None  # tied to the embedding

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> MLACache:
        weight = self.embed.weight
        return MLACache(self.config, batch_size, capacity, dtype=weight.dtype, device=weight.device)

    @torch.no_grad()
    def forward(self, tokens: Tensor, cache: MLACache) -> Tensor:
        """Extend `cache` by tokens `[B, N]`; float32 logits `[B, N, V]` (inference; training uses `lm.logits`)."""
        N = tokens.shape[1]
        positions = cache.length + torch.arange(N, device=tokens.device)  # [N]
        x = self.embed(tokens)  # [B, N, d]
        for i, block in enumerate(self.layers):
            x = x + block.attn(block.attn_norm(x), positions, cache, i)
            x = x + block.mlp(block.mlp_norm(x))
        cache.length += N
        return F.linear(self.norm(x), self.embed.weight).float()  # [B, N, V]
