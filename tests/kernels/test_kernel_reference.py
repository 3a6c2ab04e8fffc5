"""The torch reference (the CPU path) against a float64 oracle that materialises Q, K, V per head."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import TOLERANCES, make_inputs, rel_err
from kernel_oracle import oracle_attention

from flashtpa.dispatch import attention
from flashtpa.inputs import AttentionInputError, AttentionInputs
from flashtpa.reference import FACTOR_SPACE_MAX_QUERIES, attention_reference

FORMS = ("contextual", "kv_only", "fixed")

# (B, N, H, D, T_cap, kv_lens, R_Q, R_K, R_V): decode, unequal lengths, extend after a prefix, prefill,
# length 1, primes, ranks 1..16, heads not a power of two, and N on both sides of the factor-space limit.
CASES = [
    (1, 1, 6, 8, 9, [1], 1, 1, 1),
    (1, 1, 9, 16, 40, [37], 6, 3, 3),
    (3, 1, 6, 8, 41, [5, 41, 2], 3, 2, 3),
    (2, 4, 10, 16, 33, [31, 4], 16, 2, 2),
    (2, 13, 6, 8, 29, [29, 13], 2, 3, 1),
    (1, 23, 12, 8, 23, [23], 6, 2, 2),
    (2, FACTOR_SPACE_MAX_QUERIES + 1, 4, 8, 50, [50, FACTOR_SPACE_MAX_QUERIES + 1], 3, 2, 2),
    (3, 19, 6, 16, 64, [19, 19, 19], 4, 6, 6),
]


def _fixed_ranks(H: int, R_K: int) -> int:
    """A group count for the fixed form that divides H (R_K when it does, else 1 = MQA)."""
    return R_K if H % R_K == 0 else 1


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}N{c[1]}H{c[2]}T{c[4]}R{c[6]}{c[7]}{c[8]}")
def test_reference_matches_oracle(form: str, case: tuple) -> None:
    B, N, H, D, T_cap, lens, R_Q, R_K, R_V = case
    if form == "fixed":
        R_K = R_V = _fixed_ranks(H, R_K)
    args = make_inputs(form=form, B=B, N=N, H=H, D=D, T_cap=T_cap, kv_lens=lens, R_Q=R_Q, R_K=R_K, R_V=R_V)
    x = AttentionInputs(**args)
    out = attention_reference(x)
    ref = oracle_attention(x)
    assert out.shape == (B, N, H, D) and out.dtype == torch.float32
    assert rel_err(out, ref) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("form", FORMS)
def test_reference_float64_and_scale(form: str) -> None:
    args = make_inputs(form=form, B=2, N=3, H=6, D=8, T_cap=17, kv_lens=[17, 5], R_K=3, R_V=3, dtype=torch.float64)
    out = attention_reference(AttentionInputs(**args), scale=0.37)
    assert out.dtype == torch.float64
    assert rel_err(out, oracle_attention(AttentionInputs(**args), scale=0.37)) <= TOLERANCES[torch.float64]


def test_reference_bfloat16_output_dtype() -> None:
    args = make_inputs(form="contextual", B=1, N=1, H=4, D=8, T_cap=12, kv_lens=[12], dtype=torch.bfloat16)
    out = attention(**args)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, oracle_attention(AttentionInputs(**args))) <= TOLERANCES[torch.bfloat16]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("N", [1, 3, FACTOR_SPACE_MAX_QUERIES + 1])  # decode, short extend, prefill
def test_a_float16_cache_under_float32_queries(form: str, N: int) -> None:
    """A cache held narrower than the model (float16 under float32, the CPU's resident GGUF weights): read widened,
    computed and returned in the queries' dtype, equal to the float32 computation on the widened cache."""
    args = make_inputs(form=form, B=2, N=N, H=4, D=16, T_cap=40, kv_lens=[40, 30], R_K=2, R_V=2, poison=False)
    narrow = {k: (v.half() if k in ("ak", "bk", "av", "bv") and v is not None else v) for k, v in args.items()}
    widened = {k: (v.float() if k in ("ak", "bk", "av", "bv") and v is not None else v) for k, v in narrow.items()}
    out = attention(**narrow)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, attention(**widened), rtol=1e-6, atol=1e-6)


def test_fixed_heads_are_gqa() -> None:
    """Fixed head factors equal SDPA over K/V repeated per head (the definition of GQA)."""
    args = make_inputs(form="fixed", B=1, N=5, H=8, D=16, T_cap=20, kv_lens=[20], R_K=2, R_V=2, poison=False)
    k = args["bk"].repeat_interleave(4, dim=2).transpose(1, 2)  # [B, H, T, D]
    v = args["bv"].repeat_interleave(4, dim=2).transpose(1, 2)
    q = args["q"].transpose(1, 2)  # [B, H, N, D]
    mask = torch.ones(5, 20, dtype=torch.bool).tril(diagonal=15)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    assert rel_err(attention(**args, backend="torch"), want) <= TOLERANCES[torch.float32]


def test_dispatch_auto_on_cpu_is_torch() -> None:
    args = make_inputs(form="kv_only", B=2, N=1, H=3, D=8, T_cap=10, kv_lens=[10, 7])
    assert torch.equal(attention(**args), attention(**args, backend="torch"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(bq=None), "aq and bq"),
        (lambda a: a.update(q=torch.zeros(2, 1, 3, 8)), "exactly one of q"),
        (lambda a: a.update(av=None), "both be given"),
        (lambda a: a.update(bk=a["bk"][:, :, :, :4]), "bv must have shape"),
        (lambda a: a.update(ak=a["ak"][:, :5]), "ak must have shape"),
        (lambda a: a.update(kv_lens=torch.tensor([11, 3], dtype=torch.int32)), "kv_lens[0] = 11"),
        (lambda a: a.update(kv_lens=torch.tensor([10, 0], dtype=torch.int32)), "kv_lens[1] = 0"),
        (lambda a: a.update(kv_lens=torch.tensor([10.0, 3.0])), "int32"),
        (lambda a: a.update(backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message: str) -> None:
    args = make_inputs(form="contextual", B=2, N=1, H=3, D=8, T_cap=10, kv_lens=[10, 3])
    change(args)
    with pytest.raises(AttentionInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        attention(**args)


def test_fixed_groups_must_divide_heads() -> None:
    args = make_inputs(form="fixed", B=1, N=1, H=6, D=8, T_cap=4, kv_lens=[4], R_K=3, R_V=3)
    args["q"] = torch.randn(1, 1, 7, 8)
    with pytest.raises(AttentionInputError, match="divide the heads"):
        attention(**args)
