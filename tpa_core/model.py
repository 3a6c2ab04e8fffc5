"""`TPAModel`: token embedding, pre-norm blocks (RMSNorm, TPA attention, SwiGLU MLP), final norm, LM head.

`forward(tokens [B, N], cache) -> logits` appends the N new tokens of each sequence to the factor cache and
attends over everything cached before them, so one call covers prefill, extend-after-a-cached-prefix and decode.
Without a cache it is an ordinary full causal forward (a fresh cache of N tokens is used and dropped).

State-dict names are those of docs/interfaces.md (`embed.weight`, `layers.{i}.attn_norm.weight`, attention
`layers.{i}.attn.w_*`, `layers.{i}.mlp.w_gate|w_up|w_down`, `norm.weight`, `lm_head.weight` unless tied).

Precision: a 16-bit model (bf16 / fp16) keeps its matrices, its matrix products and its factor cache in 16 bits,
but the residual stream, the norms (and their weights) and the logits in float32 (`residual_dtype`): a 16-bit
residual rounds every layer's update to 8 (bf16) mantissa bits and 16-bit logits tie, which flips near-tied
top-1 tokens (benchmarks/RESULTS.md, "bf16 on the GPU, end to end").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpa_core import fused_decode
from tpa_core.attention import ONEDNN_MIN_ROWS, FusedParams, StepInfo, TPAAttention, linear
from tpa_core.cache import FactorCache
from tpa_core.config import TPAConfig
from tpa_core.errors import TPAError
from tpa_core.quant.linear import QuantLinear
from tpa_core.rope import Rope

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def residual_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """The residual stream's (and the norms') dtype for a model of `dtype`: float32 for 16-bit models."""
    return torch.float32 if dtype in SIXTEEN_BIT else dtype


def numerics_tag(dtype: torch.dtype) -> str:
    """How a model of `dtype` computes its factors beyond that dtype, for the store's namespace ("" when the
    residual stream is the model dtype): 16-bit factors computed over a float32 residual differ from those computed
    over a 16-bit one, so their pages never share a namespace."""
    residual = residual_dtype(dtype)
    return "" if residual == dtype else f"residual={str(residual).removeprefix('torch.')}"


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, with a learnable weight or none (T6); eps None = float32's epsilon for 16-bit
    and float32 models (F.rms_norm's default on the float32 residual), float64's for float64.

    Computes in the residual dtype (its weight is held in it) and returns `dtype`, the input of the next matrix
    product."""

    def __init__(self, dim: int, eps: float | None, has_weight: bool, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dim, self.eps, self.out_dtype = dim, eps, dtype
        self.weight = (nn.Parameter(torch.ones(dim, device=device, dtype=residual_dtype(dtype))) if has_weight
                       else None)

    def forward(self, x: Tensor) -> Tensor:
        """x `[..., d]` (residual dtype) -> `[..., d]` (the model dtype)."""
        out = F.rms_norm(x, (self.dim,), self.weight, self.eps)
        return out if self.out_dtype is None else out.to(self.out_dtype)


class SwiGLU(FusedParams):
    """w_down(silu(w_gate x) * w_up x); gate and up run as one matmul (state dict: `w_gate`, `w_up`, `w_down`)."""

    def __init__(self, d_model: int, hidden: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden = hidden
        self.w_gate_up = nn.Parameter(torch.empty(2 * hidden, d_model, device=device, dtype=dtype))  # [2F, d]
        self.w_down = nn.Parameter(torch.empty(d_model, hidden, device=device, dtype=dtype))  # [d, F]
        self.fused = {"w_gate_up": [("w_gate", hidden), ("w_up", hidden)]}
        self.packed: dict[str, QuantLinear] = {}  # w_gate_up / w_down resident in GGUF blocks (tpa_core.quant)
        nn.init.normal_(self.w_gate_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """x `[B, N, d]` -> `[B, N, d]`."""
        gate, up = linear(x, self.w_gate_up, packed=self.packed.get("w_gate_up")).split(self.hidden, dim=-1)
        if torch.is_grad_enabled():  # gate, up: [B, N, F] views of one [B, N, 2F] product
            hidden = F.silu(gate) * up
        else:  # in place: a prefill holds the one product, not two more tensors of its half's size
            hidden = F.silu(gate, inplace=True).mul_(up)
        return linear(hidden, self.w_down, packed=self.packed.get("w_down"))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: TPAConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        c = config
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps, c.norm_has_weight, device, dtype)
        self.attn = TPAAttention(c, device, dtype)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps, c.norm_has_weight, device, dtype)
        self.mlp = SwiGLU(c.d_model, c.mlp_hidden, device, dtype)

    def forward(self, x: Tensor, cache: FactorCache, layer: int, step: StepInfo) -> Tensor:
        """x `[B, N, d]` -> `[B, N, d]`, the residual stream (float32 for 16-bit models: the sums promote)."""
        # .forward directly: nn.Module.__call__ costs a few microseconds, ~150 calls per decoded token
        x = x + self.attn.forward(self.attn_norm.forward(x), cache, layer, step)
        return x + self.mlp.forward(self.mlp_norm.forward(x))


class TPAModel(nn.Module):
    """A TPA decoder for any of the three attention forms of `TPAConfig`."""

    def __init__(self, config: TPAConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model, device=device, dtype=dtype)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.layers = nn.ModuleList(Block(c, device, dtype) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.norm_eps, c.norm_has_weight, device, dtype)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False,
                                                               device=device, dtype=dtype)
        self.rope = Rope(c)
        self.attention_backend = "auto"  # "auto" | "torch" | "triton", passed to flashtpa.dispatch
        # one compiled call per block for single-token decode steps where the model qualifies (tpa_core.fused_decode)
        self.fused_decode = True
        self._head_t: Tensor | None = None  # see _head_transposed
        self._head_t_key: tuple | None = None
        self.packed_head: QuantLinear | None = None  # the LM head resident in GGUF blocks (tpa_core.quant)
        self._cache_dtype: torch.dtype | None = None  # see cache_dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of this model's factor cache: the model's own, or a narrower one set at load (resident GGUF
        weights, `tpa_core.quant.formats.CACHE_DTYPE`). Attention reads it in the compute dtype."""
        return self._cache_dtype or self.dtype

    @cache_dtype.setter
    def cache_dtype(self, dtype: torch.dtype | None) -> None:
        self._cache_dtype = dtype

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> FactorCache:
        """An empty factor cache for this model (its cache dtype and device)."""
        return FactorCache(self.config, batch_size=batch_size, capacity=capacity, dtype=self.cache_dtype,
                           device=self.device)

    @torch.inference_mode()
    def forward(self, tokens: Tensor, cache: FactorCache | None = None, *, seq: int | None = None,
                last_only: bool = False) -> Tensor:
        """Run N new tokens per sequence through the model, appending their factors to `cache`.

        Args:
            tokens: `[B, N]` token ids; B = the cache's batch size, or 1 with `seq` given.
            cache: the factor cache to extend; None = a full forward from position 0 with a private cache.
            seq: extend only this sequence of the cache (its own length; the others are untouched).
            last_only: compute logits for the last position only (prefill and decode need nothing else).

        Returns:
            logits `[B, N, V]` (or `[B, 1, V]` with `last_only`), float32. Runs under torch.inference_mode:
            this is an inference engine, and the factor cache holds inference tensors.
        """
        if tokens.dim() != 2:
            raise TPAError(f"tokens must be [B, N], got shape {tuple(tokens.shape)}")
        B, N = tokens.shape
        if cache is None:
            cache = self.new_cache(batch_size=B, capacity=max(N, 1))
        elif cache.dtype != self.cache_dtype or not _same_device(cache.device, self.device) or (
                cache.config is not self.config and cache.config != self.config):
            raise TPAError(f"the cache was made for another model ({cache.config.arch}, {cache.dtype}, "
                           f"{cache.device}); this one is {self.config.arch}, {self.cache_dtype}, {self.device}")
        rows = slice(None) if seq is None else slice(seq, seq + 1)
        if seq is not None:
            cache.length(seq)  # validates seq
        seqs = range(cache.batch_size)[rows]
        if len(seqs) != B:
            raise TPAError(f"tokens hold {B} sequences but the cache rows selected hold {len(seqs)}")
        if N == 0:
            raise TPAError("forward needs at least one new token per sequence")
        starts = [cache.length(b) for b in seqs]
        end = max(starts) + N
        if end > self.config.max_position_embeddings:
            raise TPAError(f"context window exceeded: {end} tokens > max_position_embeddings "
                           f"{self.config.max_position_embeddings}")
        cache.reserve(end)
        positions = torch.tensor(starts, device=tokens.device)[:, None] + torch.arange(N, device=tokens.device)
        step = StepInfo(rows=rows, starts=starts, kv_lens=cache.lengths[rows] + N,
                        rope=self.rope.tables(positions, self.dtype), backend=self.attention_backend)
        x = self.embed(tokens).to(residual_dtype(self.dtype))  # [B, N, d], the residual stream
        plan = fused_decode.plan_for(self) if self.fused_decode and fused_decode.applies(step, tokens) else None
        if plan is not None:
            plan.run(x, cache, step)  # x updated in place
        else:
            for i, block in enumerate(self.layers):
                x = block.forward(x, cache, i, step)
        cache.advance(N, rows)
        if last_only:
            x = x[:, -1:]  # [B, 1, d]
        x = self.norm(x)  # [B, n, d], the model dtype
        return self._logits(x)

    def _logits(self, x: Tensor) -> Tensor:
        """x `[B, n, d]` -> float32 logits `[B, n, V]`; a 16-bit model's product is accumulated and returned in
        float32 (no 16-bit rounding of the logits, whose ties would decide the argmax)."""
        B, n, d = x.shape
        if self.packed_head is not None:  # resident GGUF blocks: float32 output
            return self.packed_head(x)  # [B, n, V]
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight  # [V, d]
        sixteen_bit = x.dtype in SIXTEEN_BIT
        if x.device.type == "cpu" and (sixteen_bit or (x.dtype == torch.float32 and B * n < ONEDNN_MIN_ROWS)):
            # against a cached float32 [d, V] copy (the CPU has no 16-bit GEMM with a float32 output)
            return torch.matmul(x.float(), self._head_transposed(weight))  # [B, n, d] @ [d, V] -> [B, n, V]
        if sixteen_bit:
            return torch.mm(x.reshape(B * n, d), weight.t(), out_dtype=torch.float32).view(B, n, -1)  # [B, n, V]
        return linear(x, weight).float()  # [B, n, V]

    def _head_transposed(self, weight: Tensor) -> Tensor:
        """The LM head as a contiguous float32 `[d, V]` copy, rebuilt whenever the weight changes (CPU only).

        A decode step's largest read: with the vocabulary as the contiguous dim, MKL's GEMV streams it about 1.8x
        faster on this CPU (6.9 -> 3.8 ms for SmolLM2's 49152 x 576 head). Costs one more copy of the head.
        """
        key = (weight.data_ptr(), weight._version, weight.dtype)
        if self._head_t_key != key:
            self._head_t = weight.detach().t().float().contiguous()  # [V, d] -> [d, V]
            self._head_t_key = key
        return self._head_t


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same device, reading a missing CUDA index as device 0 ("cuda" vs "cuda:0")."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)
