"""`TPAAttention`: x -> TPA factors -> factor cache -> `flashtpa.dispatch.attention` -> output projection.

Three forms (TPAConfig.form), one code path each:

- "contextual": aq, bq, ak, bk, av, bv all from x (T6);
- "kv_only":    q, ak, bk, av, bv (T6 KV-only);
- "fixed":      q, bk, bv; the head factors are constants (MHA/GQA/MQA, Qwen2 biases included), so the cache
                holds only the B factors, which are exactly the GQA K/V heads.

RoPE goes on bq/bk (or q), never on A factors or bv. All input projections run as one matmul over a fused
weight; `state_dict()` and `load_state_dict()` still speak the per-factor names of docs/interfaces.md
(`w_aq`, `w_bq` | `w_q`, `w_ak`, `w_bk`, `w_av`, `w_bv`, biases `b_q`, `b_bk`, `b_bv`, and `w_o`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashtpa.dispatch import attention
from tpa_core.cache import FactorCache
from tpa_core.config import TPAConfig
from tpa_core.quant.linear import QuantLinear
from tpa_core.rope import Rope, RopeTables, apply_rope

logger = logging.getLogger(__name__)

# Rows (tokens) from which a float32 CPU projection runs through oneDNN instead of F.linear (MKL sgemm): oneDNN's
# GEMM is about twice as fast on AMD CPUs from 16 rows on, while one row (decode, a GEMV) is faster in MKL
# (benchmarks/NOTES.md, "CPU engine"). On Intel CPUs the two GEMMs are equally fast and oneDNN's layout
# conversions cost about a tenth of a prefill, so they keep MKL (NOTES.md, "Activation levels, VNNI, and an Intel
# host").
ONEDNN_MIN_ROWS = 16
# None = not decided yet; False: F.linear (an Intel CPU, or a build without a working oneDNN linear)
_onednn: dict[str, bool | None] = {"usable": None}


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in info)
    except OSError:
        return False


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, packed: QuantLinear | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`: x `[..., d]`, weight `[F, d]` -> `[..., F]`; prefill-sized float32 CPU inputs
    go through oneDNN on non-Intel CPUs, where its GEMM is about twice as fast as MKL's sgemm (plain layout, no
    weight copy kept). `packed`: the weight resident in its GGUF blocks (`tpa_core.quant`); `weight` is then a
    placeholder."""
    if packed is not None:
        out = packed(x)  # [..., F]
        return out if bias is None else out + bias
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if _onednn["usable"] is None and _intel_cpu():
        logger.info("Intel CPU: prefill projections use MKL (F.linear), as fast as oneDNN here without conversions")
        _onednn["usable"] = False
    # oneDNN tensors have no autograd: training (gradients on) stays on F.linear
    if (rows >= ONEDNN_MIN_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"
            and _onednn["usable"] is not False and not torch.is_grad_enabled()):
        try:
            x2 = x.reshape(rows, x.shape[-1]).contiguous()  # [M, d]
            out = torch.ops.aten.mkldnn_linear(x2.to_mkldnn(), weight.to_mkldnn(),
                                               None if bias is None else bias.to_mkldnn())
            _onednn["usable"] = True
            return out.to_dense().view(*x.shape[:-1], weight.shape[0])  # [M, F] -> [..., F]
        except (RuntimeError, NotImplementedError) as exc:
            if _onednn["usable"]:
                raise
            logger.info("oneDNN linear unavailable (%s); using F.linear", exc)
            _onednn["usable"] = False
    return F.linear(x, weight, bias)


@dataclass
class StepInfo:
    """What every layer needs to know about one forward call, built once per call.

    rows: the cache rows (sequences) this call extends; starts: their lengths before the call (host ints);
    kv_lens: `[B']` int32 lengths after the call; rope: tables for the new positions; backend: attention backend.
    """

    rows: slice
    starts: list[int]
    kv_lens: Tensor
    rope: RopeTables
    backend: str = "auto"


class FusedParams(nn.Module):
    """Base for modules whose parameters are concatenations of named parts along dim 0.

    `self.fused[param_name] = [(part_name | None, rows), ...]`: `state_dict` splits the fused parameter into its
    named parts (clones, so they can be saved with safetensors); `load_state_dict` concatenates them back.
    A part named None is not in the state dict and loads as zeros (the bias of a factor that has none).
    """

    fused: dict[str, list[tuple[str | None, int]]]

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # torch signature
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for fused_name, parts in self.fused.items():
            if prefix + fused_name not in destination:
                continue
            value = destination.pop(prefix + fused_name)
            offset = 0
            for part, rows in parts:
                if part is not None:
                    piece = value[offset:offset + rows]
                    destination[prefix + part] = piece if keep_vars else piece.detach().clone()
                offset += rows

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        unloaded = []
        for fused_name, parts in self.fused.items():
            param = getattr(self, fused_name)
            given = [state_dict.get(prefix + part) for part, _ in parts if part is not None]
            # On the meta device (loading with assign=True) the parts keep their own device and dtype.
            like = next((t for t in given if t is not None), param) if param.is_meta else param
            pieces, complete = [], True
            for part, rows in parts:
                expected = (rows, *param.shape[1:])
                if part is None:
                    pieces.append(torch.zeros(expected, dtype=like.dtype, device=like.device))
                    continue
                piece = state_dict.pop(prefix + part, None)
                if piece is None:
                    missing_keys.append(prefix + part)
                    complete = False
                elif tuple(piece.shape) != expected:
                    error_msgs.append(f"size mismatch for {prefix + part}: copying a param with shape "
                                      f"{tuple(piece.shape)}, the model has {expected}")
                    complete = False
                else:
                    pieces.append(piece.to(device=like.device, dtype=like.dtype))
            if complete:
                state_dict[prefix + fused_name] = torch.cat(pieces, dim=0)
            else:
                unloaded.append(prefix + fused_name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for name in unloaded:  # already reported under the part names
            if name in missing_keys:
                missing_keys.remove(name)


class TPAAttention(FusedParams):
    """Multi-head attention in TPA factor form.

    Two calls: `attn(x, cache, layer, step)` is the engine's (appends to a `FactorCache`, attends through
    `flashtpa.dispatch`); `attn(x, positions)` is a plain differentiable causal self-attention over the N tokens
    of x, for training or for use as a layer in any PyTorch model. Both return `[B, N, d]`.
    """

    def __init__(self, config: TPAConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        c = config
        self.config = c
        self.form = c.form
        self.n_heads, self.head_dim = c.n_heads, c.head_dim
        self.q_rank, self.k_rank, self.v_rank = c.q_rank, c.k_rank, c.v_rank
        H, D = c.n_heads, c.head_dim
        if self.form == "contextual":
            parts = [("aq", H * c.q_rank), ("bq", c.q_rank * D)]
        else:
            parts = [("q", H * D)]
        if c.contextual_kv:
            parts += [("ak", H * c.k_rank), ("bk", c.k_rank * D), ("av", H * c.v_rank), ("bv", c.v_rank * D)]
        else:
            parts += [("bk", c.k_rank * D), ("bv", c.v_rank * D)]
        self.part_names = [name for name, _ in parts]
        self.part_sizes = [rows for _, rows in parts]
        biased = {"q", "bk", "bv"} if c.qkv_bias else set()
        factory = {"device": device, "dtype": dtype}
        total = sum(self.part_sizes)
        self.w_in = nn.Parameter(torch.empty(total, c.d_model, **factory))  # [sum of parts, d]
        self.b_in = nn.Parameter(torch.zeros(total, **factory)) if biased else None
        self.w_o = nn.Parameter(torch.empty(c.d_model, H * D, **factory))  # [d, H*D]
        self.fused = {"w_in": [(f"w_{name}", rows) for name, rows in parts]}
        self.packed: dict[str, QuantLinear] = {}  # w_in / w_o resident in GGUF blocks (tpa_core.quant)
        self._rope: Rope | None = None  # RoPE tables of the `attn(x, positions)` call, made on first use
        if biased:
            self.fused["b_in"] = [(f"b_{name}" if name in biased else None, rows) for name, rows in parts]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init (tests and fresh models); loading overwrites it."""
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_o, std=0.02)
        if self.b_in is not None:
            nn.init.zeros_(self.b_in)

    def factors(self, x: Tensor, rope: RopeTables) -> dict[str, Tensor]:
        """The new tokens' factors, RoPE applied: name -> [B, N, H, R_Q] / [B, N, R, D] / [B, N, H, D] (q)."""
        B, N, _ = x.shape
        H, D = self.n_heads, self.head_dim
        y = linear(x, self.w_in, self.b_in, self.packed.get("w_in"))  # [B, N, sum of parts]
        parts = dict(zip(self.part_names, y.split(self.part_sizes, dim=-1)))  # [B, N, rows of each part]
        out: dict[str, Tensor] = {}
        if self.form == "contextual":
            out["aq"] = parts["aq"].view(B, N, H, self.q_rank)  # [B, N, H, R_Q]
            out["bq"] = apply_rope(parts["bq"].view(B, N, self.q_rank, D), rope)  # [B, N, R_Q, D]
        else:
            out["q"] = apply_rope(parts["q"].view(B, N, H, D), rope)  # [B, N, H, D]
        out["bk"] = apply_rope(parts["bk"].view(B, N, self.k_rank, D), rope)  # [B, N, R_K, D]
        out["bv"] = parts["bv"].view(B, N, self.v_rank, D)  # [B, N, R_V, D]
        if self.form != "fixed":
            out["ak"] = parts["ak"].view(B, N, H, self.k_rank)  # [B, N, H, R_K]
            out["av"] = parts["av"].view(B, N, H, self.v_rank)  # [B, N, H, R_V]
        return out

    def output(self, out: Tensor) -> Tensor:
        """The output projection: out `[B, N, H*D]` -> `[B, N, d]`, with the resident blocks where the model holds
        them (`packed`; `w_o` is then a placeholder)."""
        return linear(out, self.w_o, packed=self.packed.get("w_o"))

    def forward(self, x: Tensor, cache: FactorCache | Tensor, layer: int = 0, step: StepInfo | None = None) -> Tensor:
        """x `[B, N, d]` -> `[B, N, d]`.

        With a `FactorCache` (x = the rows `step.rows` of it): appends the K/V factors and attends over the cache.
        With integer positions `[N]` or `[B, N]` instead: causal attention over x alone (`forward_dense`).
        """
        if not isinstance(cache, FactorCache):
            return self.forward_dense(x, cache)
        if step is None:
            raise TypeError("TPAAttention(x, cache, layer, step) needs the StepInfo of the call")
        B, N, _ = x.shape
        f = self.factors(x, step.rope)
        cache.write(layer, {name: f[name] for name in cache.names}, step.starts, step.rows)
        buf = cache.layer(layer, step.rows)  # name -> [B, T_cap, ...] views
        out = attention(
            q=f.get("q"), aq=f.get("aq"), bq=f.get("bq"),
            ak=buf.get("ak"), bk=buf["bk"], av=buf.get("av"), bv=buf["bv"],
            kv_lens=step.kv_lens, backend=step.backend,
        )  # [B, N, H, D]
        out = out.reshape(B, N, self.n_heads * self.head_dim)  # [B, N, H, D] -> [B, N, H*D]
        return self.output(out)  # [B, N, d]

    def forward_dense(self, x: Tensor, positions: Tensor) -> Tensor:
        """Causal self-attention over the N tokens of x `[B, N, d]` at RoPE `positions` `[N]` or `[B, N]`.

        Plain differentiable torch: Q, K, V `[B, H, N, D]` are built from the factors (Q = A_Q B_Q / R_Q, ...)
        and handed to SDPA; fixed head factors run as grouped-query SDPA. Token n attends to tokens 0..n of x,
        whatever the positions (they only rotate). No cache is read or written.
        """
        B, N, _ = x.shape
        H, D = self.n_heads, self.head_dim
        if positions.dim() == 1 and positions.shape[0] == N:
            positions = positions.unsqueeze(0).expand(B, N)  # [B, N]
        if tuple(positions.shape) != (B, N) or positions.is_floating_point():
            raise ValueError(f"positions must be integers of shape [{N}] or [{B}, {N}], "
                             f"got {positions.dtype} {tuple(positions.shape)}")
        if self._rope is None:
            self._rope = Rope(self.config)
        f = self.factors(x, self._rope.tables(positions.to(x.device), self.w_in.dtype))
        if self.form == "contextual":
            q = torch.matmul(f["aq"], f["bq"]) / self.q_rank  # [B, N, H, R_Q] @ [B, N, R_Q, D] -> [B, N, H, D]
        else:
            q = f["q"]  # [B, N, H, D]
        if self.form == "fixed":
            k, v = f["bk"], f["bv"]  # [B, N, G, D]: the K/V heads themselves
        else:
            k = torch.matmul(f["ak"], f["bk"]) / self.k_rank  # [B, N, H, R_K] @ [B, N, R_K, D] -> [B, N, H, D]
            v = torch.matmul(f["av"], f["bv"]) / self.v_rank  # [B, N, H, D]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H or G, N, D]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D ** -0.5,
                                             enable_gqa=k.shape[1] != H)  # [B, H, N, D]
        out = out.transpose(1, 2).reshape(B, N, H * D)  # [B, H, N, D] -> [B, N, H*D]
        return self.output(out)  # [B, N, d]
