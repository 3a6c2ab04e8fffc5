"""The Triton kernels' CPU cases, run in a child process with TRITON_INTERPRET=1 (see test_triton_interpret.py).

Triton picks the interpreter when `triton.language` and each kernel are decorated, i.e. at import, so the
interpreted run needs a fresh interpreter process; this keeps the variable from leaking into any other test.
Run as a script, it executes every case and prints one JSON object {case_id: {"err": ..., "ok": ..., "detail": ...}}.
bf16 tl.dot is wrong in the interpreter, so the cases use float32/float16.
"""

from __future__ import annotations

import json
import sys
import traceback

import torch
from kernel_inputs import TOLERANCES, decode_config, make_inputs, prefill_config, rel_err
from kernel_oracle import oracle_attention

from flashtpa.inputs import AttentionInputs

# form, B, H, D, T_cap, kv_lens, (R_Q, R_K, R_V), dtype, config fields (`kernel_inputs.decode_config`)
DECODE_CASES = [
    ("contextual", 1, 1, 16, 4, [1], (1, 1, 1), torch.float32, {}),
    ("contextual", 3, 5, 16, 20, [17, 16, 15], (6, 2, 2), torch.float32, {"block_t": 16, "min_chunk": 8}),
    ("contextual", 2, 7, 32, 40, [31, 2], (16, 1, 1), torch.float32, {"block_t": 16, "min_chunk": 4}),
    ("contextual", 1, 12, 16, 60, [53], (3, 3, 1), torch.float32, {"block_t": 16, "min_chunk": 16}),
    ("contextual", 2, 3, 16, 64, [5, 1], (2, 2, 2), torch.float32, {"block_t": 32, "min_chunk": 2}),
    ("contextual", 1, 6, 16, 97, [97], (6, 2, 2), torch.float32, {"block_t": 16, "min_chunk": 4, "num_splits": 7}),
    ("contextual", 2, 5, 16, 70, [70, 33], (4, 3, 2), torch.float32,
     {"block_t": 16, "min_chunk": 8, "prefetch": False}),
    ("contextual", 2, 10, 16, 50, [50, 29], (6, 2, 3), torch.float16, {"block_t": 16, "min_chunk": 8}),
    ("kv_only", 2, 9, 16, 40, [37, 1], (0, 2, 3), torch.float32, {"block_t": 16, "min_chunk": 8}),
    ("kv_only", 1, 3, 16, 29, [29], (0, 6, 6), torch.float32, {"block_t": 16, "min_chunk": 5}),
    ("fixed", 3, 9, 16, 48, [41, 17, 1], (0, 3, 3), torch.float32, {"block_t": 16, "min_chunk": 8}),
    ("fixed", 1, 8, 32, 23, [23], (0, 8, 8), torch.float32, {"block_t": 16, "min_chunk": 3}),
    ("fixed", 2, 6, 16, 40, [16, 33], (0, 1, 1), torch.float32, {"block_t": 16, "min_chunk": 16}),
    ("fixed", 2, 9, 16, 40, [40, 13], (0, 3, 3), torch.float16, {"block_t": 16, "min_chunk": 8}),
    # head tiles (several programs per slice, the last one partial); rank-1 head factors loaded in their block
    # (the default from 128 heads a program on)
    ("contextual", 2, 34, 16, 40, [40, 23], (6, 2, 2), torch.float32, {"block_t": 16, "min_chunk": 8, "head_tile": 16}),
    ("contextual", 1, 20, 16, 48, [48], (16, 1, 1), torch.float32,
     {"block_t": 16, "min_chunk": 16, "head_tile": 16, "prefetch": False}),
    ("contextual", 2, 17, 16, 37, [37, 9], (3, 3, 2), torch.float16, {"block_t": 16, "min_chunk": 4, "head_tile": 16}),
    ("kv_only", 2, 33, 16, 50, [50, 16], (0, 3, 2), torch.float32, {"block_t": 16, "min_chunk": 16, "head_tile": 32}),
    ("contextual", 1, 5, 16, 64, [64], (6, 2, 2), torch.float32, {"block_t": 16, "min_chunk": 16}),
    # more slices than the merge tiles in one go (S_PAD 512 / 1024: the merge splits D), most of them empty
    ("contextual", 1, 3, 16, 700, [700], (2, 2, 2), torch.float32, {"block_t": 16, "min_chunk": 2, "num_splits": 300}),
    ("fixed", 2, 4, 16, 600, [600, 3], (0, 2, 2), torch.float32, {"block_t": 16, "min_chunk": 1, "num_splits": 600}),
    # whole blocks through TMA descriptors (the interpreter emulates them), each slice's partial block through pointers
    ("contextual", 2, 7, 16, 75, [75, 40], (16, 1, 1), torch.float32, {"block_t": 16, "min_chunk": 20, "tma": True}),
    ("kv_only", 1, 5, 16, 90, [83], (0, 2, 3), torch.float16, {"block_t": 16, "min_chunk": 16, "tma": True}),
    ("fixed", 2, 8, 16, 75, [75, 29], (0, 2, 2), torch.float16, {"block_t": 16, "min_chunk": 20, "tma": True}),
]

# form, B, N, H, D, T_cap, kv_lens, (R_Q, R_K, R_V), dtype, config fields (`kernel_inputs.prefill_config`)
PREFILL_CASES = [
    ("contextual", 2, 5, 5, 16, 44, [40, 5], (6, 2, 2), torch.float32, {"block_n": 16, "block_t": 16}),
    ("contextual", 1, 17, 3, 16, 17, [17], (2, 3, 1), torch.float32, {"block_n": 16, "block_t": 16}),
    ("contextual", 1, 16, 2, 32, 50, [47], (16, 1, 1), torch.float32, {"block_n": 16, "block_t": 16}),
    ("contextual", 2, 19, 3, 16, 33, [19, 31], (6, 2, 2), torch.float16, {"block_n": 16, "block_t": 32}),
    ("kv_only", 2, 15, 7, 16, 32, [31, 15], (0, 1, 2), torch.float32, {"block_n": 16, "block_t": 16}),
    ("kv_only", 1, 3, 4, 16, 24, [23], (0, 16, 16), torch.float32, {"block_n": 16, "block_t": 16}),
    ("fixed", 2, 33, 9, 16, 40, [33, 40], (0, 3, 3), torch.float32, {"block_n": 32, "block_t": 16}),
    ("fixed", 2, 2, 4, 16, 19, [2, 19], (0, 2, 2), torch.float32, {"block_n": 16, "block_t": 16}),
    ("fixed", 1, 31, 6, 16, 31, [31], (0, 6, 6), torch.float16, {"block_n": 16, "block_t": 16}),
    ("contextual", 2, 21, 3, 16, 50, [50, 21], (6, 2, 2), torch.float32, {"block_n": 16, "block_t": 16}),
    ("kv_only", 1, 40, 2, 16, 40, [40], (0, 3, 1), torch.float16, {"block_n": 16, "block_t": 16}),
    ("contextual", 2, 23, 3, 16, 60, [60, 23], (16, 1, 1), torch.float16, {"block_n": 16, "block_t": 16}),
    ("kv_only", 1, 33, 5, 32, 45, [45], (0, 2, 3), torch.float16, {"block_n": 16, "block_t": 32}),
    ("fixed", 2, 17, 4, 16, 30, [30, 17], (0, 2, 2), torch.float16, {"block_n": 16, "block_t": 16}),
    # factored queries built by their own kernel before the attention kernel (the 1 / R_Q rides on the logit scale)
    ("contextual", 2, 18, 5, 16, 40, [40, 18], (6, 2, 2), torch.float32,
     {"block_n": 16, "block_t": 16, "prebuild_queries": True}),
    ("contextual", 1, 29, 3, 32, 29, [29], (16, 1, 1), torch.float16,
     {"block_n": 16, "block_t": 16, "prebuild_queries": True}),
    # unmasked key blocks through TMA descriptors (the interpreter emulates them), masked ones through pointers
    ("contextual", 2, 20, 3, 16, 70, [70, 37], (6, 2, 2), torch.float32, {"block_n": 16, "block_t": 16, "tma": True}),
    ("kv_only", 1, 17, 5, 16, 64, [60], (0, 1, 2), torch.float16, {"block_n": 16, "block_t": 16, "tma": True}),
    ("fixed", 2, 24, 6, 16, 57, [57, 24], (0, 3, 3), torch.float16, {"block_n": 16, "block_t": 16, "tma": True}),
    # three query tiles, launched last to first
    ("contextual", 2, 37, 3, 16, 50, [50, 37], (6, 2, 2), torch.float32, {"block_n": 16, "block_t": 16}),
]


def _rank_tag(ranks: tuple[int, int, int]) -> str:
    return "R" + "-".join(map(str, ranks))


def decode_id(c: tuple) -> str:
    return f"decode-{c[0]}-B{c[1]}H{c[2]}D{c[3]}T{c[4]}L{'.'.join(map(str, c[5]))}{_rank_tag(c[6])}-{str(c[7])[6:]}"


def prefill_id(c: tuple) -> str:
    return (f"prefill-{c[0]}-B{c[1]}N{c[2]}H{c[3]}D{c[4]}T{c[5]}L{'.'.join(map(str, c[6]))}"
            f"{_rank_tag(c[7])}-{str(c[8])[6:]}")


def _inputs(form, B, N, H, D, T_cap, lens, ranks, dtype, **kw):
    R_Q, R_K, R_V = ranks
    return make_inputs(form=form, B=B, N=N, H=H, D=D, T_cap=T_cap, kv_lens=lens, R_Q=max(R_Q, 1), R_K=R_K,
                       R_V=R_V, dtype=dtype, seed=B * 1000 + N * 100 + H + T_cap, **kw)


def _check(out: torch.Tensor, ref: torch.Tensor, shape: tuple, dtype: torch.dtype) -> dict:
    err = rel_err(out, ref)
    ok = tuple(out.shape) == shape and out.dtype == dtype and err <= TOLERANCES[dtype]
    return {"err": err, "ok": ok, "detail": f"shape {tuple(out.shape)} dtype {out.dtype} rel err {err:.3g}"}


def run_decode(c: tuple) -> dict:
    from flashtpa.triton_decode import decode_attention

    form, B, H, D, T_cap, lens, ranks, dtype, fields = c
    x = AttentionInputs(**_inputs(form, B, 1, H, D, T_cap, lens, ranks, dtype))
    out = decode_attention(x, D ** -0.5, decode_config(x, **fields))
    return _check(out, oracle_attention(x), (B, 1, H, D), dtype)


def run_prefill(c: tuple) -> dict:
    from flashtpa.triton_prefill import prefill_attention

    form, B, N, H, D, T_cap, lens, ranks, dtype, fields = c
    x = AttentionInputs(**_inputs(form, B, N, H, D, T_cap, lens, ranks, dtype))
    out = prefill_attention(x, D ** -0.5, prefill_config(x, **fields))
    return _check(out, oracle_attention(x), (B, N, H, D), dtype)


def run_dispatch(N: int) -> dict:
    """backend="triton" through the public entry point, with the default launch parameters."""
    from flashtpa.dispatch import attention

    args = make_inputs(form="contextual", B=2, N=N, H=4, D=16, T_cap=300, kv_lens=[300, 9], R_Q=6)
    out = attention(**args, backend="triton", scale=0.3)
    return _check(out, oracle_attention(AttentionInputs(**args), scale=0.3), (2, N, 4, 16), torch.float32)


def run_logit_gap() -> dict:
    """One slice holds logits 1,000 above the rest: the max-LSE merge must return that slice's average."""
    from flashtpa.triton_decode import decode_attention

    args = make_inputs(form="kv_only", B=1, N=1, H=2, D=16, T_cap=64, kv_lens=[64], R_K=1, R_V=1, poison=False)
    args["q"] = torch.ones(1, 1, 2, 16)
    args["ak"][:] = 1.0
    args["av"][:] = 1.0
    args["bk"][:] = 0.0
    args["bk"][0, 40:48] = 250.0  # logit 0.25 * 16 * 250 = 1,000 on tokens 40..47 (slice [32, 48)), 0 elsewhere
    x = AttentionInputs(**args)
    out = decode_attention(x, 0.25, decode_config(x, block_t=16, min_chunk=16))
    want = args["bv"][0, 40:48, 0].mean(0)  # [D]
    err = float((out[0, 0, 0] - want).abs().max())
    ok = bool(torch.isfinite(out).all()) and err < 1e-5
    return {"err": err, "ok": ok, "detail": f"finite {bool(torch.isfinite(out).all())} max abs err {err:.3g}"}


def run_unsupported_head_dim() -> dict:
    from flashtpa.inputs import AttentionInputError
    from flashtpa.triton_attention import attention_triton

    args = make_inputs(form="fixed", B=1, N=1, H=2, D=24, T_cap=4, kv_lens=[4], R_K=1, R_V=1)
    try:
        attention_triton(AttentionInputs(**args))
    except AttentionInputError as e:
        return {"err": 0.0, "ok": "power-of-two head dim" in str(e), "detail": str(e)}
    return {"err": 0.0, "ok": False, "detail": "no AttentionInputError for D=24"}


def all_cases() -> dict:
    """case id -> zero-argument callable."""
    cases = {decode_id(c): (lambda c=c: run_decode(c)) for c in DECODE_CASES}
    cases.update({prefill_id(c): (lambda c=c: run_prefill(c)) for c in PREFILL_CASES})
    cases.update({f"dispatch-N{n}": (lambda n=n: run_dispatch(n)) for n in (1, 4)})
    cases["logit-gap-1000"] = run_logit_gap
    cases["unsupported-head-dim"] = run_unsupported_head_dim
    return cases


def main() -> None:
    results = {}
    for name, fn in all_cases().items():
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001 - reported per case; the test prints the traceback
            results[name] = {"err": float("nan"), "ok": False, "detail": traceback.format_exc()}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
