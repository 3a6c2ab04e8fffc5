"""TPAAttention in factor space equals attention on materialized Q/K/V (independent float64 oracle)."""

from __future__ import annotations

import math

import pytest
import torch

from tpa_core.attention import StepInfo, TPAAttention
from tpa_core.cache import FactorCache
from tpa_core.errors import TPAError
from tpa_core.model import TPAModel
from tpa_core.rope import Rope


def _random_attention(config, seed=0) -> TPAAttention:
    torch.manual_seed(seed)
    attn = TPAAttention(config)
    with torch.no_grad():
        attn.w_in.normal_(0, 1 / math.sqrt(config.d_model))
        attn.w_o.normal_(0, 1 / math.sqrt(config.q_dim))
        if attn.b_in is not None:
            attn.b_in.normal_(0, 0.3)
    return attn.eval()


def _run(attn, config, cache, x, rows=slice(None)):
    """One attention call appending x `[B', N, d]` to `cache` rows; returns `[B', N, d]`."""
    B, N, _ = x.shape
    seqs = range(cache.batch_size)[rows]
    starts = [cache.length(b) for b in seqs]
    positions = torch.tensor(starts)[:, None] + torch.arange(N)
    cache.reserve(max(starts) + N)
    step = StepInfo(rows=rows, starts=starts, kv_lens=cache.lengths[rows] + N,
                    rope=Rope(config).tables(positions), backend="torch")
    with torch.inference_mode():
        out = attn(x, cache, 0, step)
    cache.advance(N, rows)
    return out


def _oracle(helpers, attn, config, xs: torch.Tensor) -> torch.Tensor:
    """Full causal attention over xs `[B, T, d]` from the paper's equations, then w_o: `[B, T, d]` float64."""
    sd = {k: v.detach() for k, v in attn.state_dict().items()}
    B, T, _ = xs.shape
    pos = torch.arange(T)[None].expand(B, T)
    Q, K, V = helpers.oracle_qkv(sd, "", xs.double(), pos, config)
    out = helpers.oracle_attention(Q, K, V, pos, torch.full((B,), T))
    return out.reshape(B, T, -1) @ sd["w_o"].double().T


@pytest.mark.parametrize("chunks", [[13], [1, 1, 1], [5, 1, 7], [4, 9]])
def test_factor_space_equals_materialized(helpers, form, chunks):
    config = helpers.tiny_config(form, n_layers=1)
    attn = _random_attention(config)
    torch.manual_seed(1)
    xs = torch.randn(2, sum(chunks), config.d_model)
    cache = FactorCache(config, batch_size=2, capacity=4)  # small: growth happens on the way
    outs, at = [], 0
    for n in chunks:
        outs.append(_run(attn, config, cache, xs[:, at:at + n]))
        at += n
    got = torch.cat(outs, dim=1)
    want = _oracle(helpers, attn, config, xs)
    assert (got.double() - want).abs().max().item() <= helpers.TOL["float32_vs_float64"]


def test_sequences_of_different_lengths(helpers, form):
    """Rows extended separately (own lengths), then decoded together: each equals its own full attention."""
    config = helpers.tiny_config(form, n_layers=1)
    attn = _random_attention(config, seed=3)
    torch.manual_seed(2)
    lens = [7, 3, 11]
    xs = [torch.randn(1, n + 2, config.d_model) for n in lens]
    cache = FactorCache(config, batch_size=3, capacity=8)
    for b, n in enumerate(lens):
        _run(attn, config, cache, xs[b][:, :n], rows=slice(b, b + 1))
    for k in range(2):  # two batched decode steps
        step_x = torch.cat([x[:, lens[b] + k:lens[b] + k + 1] for b, x in enumerate(xs)], dim=0)  # [3, 1, d]
        got = _run(attn, config, cache, step_x)
        for b in range(3):
            want = _oracle(helpers, attn, config, xs[b][:, :lens[b] + k + 1])[:, -1]
            assert (got[b, 0].double() - want[0]).abs().max().item() <= helpers.TOL["float32_vs_float64"]
    assert cache.lengths.tolist() == [n + 2 for n in lens]


def test_fixed_head_factors_store_only_b_factors(helpers):
    cache = FactorCache(helpers.tiny_config("fixed"), batch_size=1, capacity=4)
    assert cache.names == ("bk", "bv")
    cache = FactorCache(helpers.tiny_config("contextual"), batch_size=1, capacity=4)
    assert set(cache.names) == {"ak", "bk", "av", "bv"}


@pytest.mark.parametrize("form_name, names", [
    ("contextual", {"w_aq", "w_bq", "w_ak", "w_bk", "w_av", "w_bv", "w_o"}),
    ("kv_only", {"w_q", "w_ak", "w_bk", "w_av", "w_bv", "w_o"}),
    ("fixed", {"w_q", "b_q", "w_bk", "b_bk", "w_bv", "b_bv", "w_o"}),
])
def test_state_dict_names_and_shapes(helpers, form_name, names):
    c = helpers.tiny_config(form_name)
    sd = TPAAttention(c).state_dict()
    assert set(sd) == names
    H, D, d = c.n_heads, c.head_dim, c.d_model
    expected = {"w_aq": (H * c.q_rank, d), "w_bq": (c.q_rank * D, d), "w_q": (H * D, d), "b_q": (H * D,),
                "w_ak": (H * c.k_rank, d), "w_av": (H * c.v_rank, d), "w_bk": (c.k_rank * D, d),
                "w_bv": (c.v_rank * D, d), "b_bk": (c.k_rank * D,), "b_bv": (c.v_rank * D,), "w_o": (d, H * D)}
    for name, value in sd.items():
        assert tuple(value.shape) == expected[name], name


def test_state_dict_round_trip_and_errors(helpers, form):
    c = helpers.tiny_config(form)
    src = helpers.random_model(c, seed=5)
    dst = TPAModel(c)
    dst.load_state_dict(src.state_dict())
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    tokens = torch.randint(0, c.vocab_size, (1, 9))
    with torch.inference_mode():
        assert torch.equal(src(tokens), dst(tokens))
    broken = src.state_dict()
    del broken["layers.1.attn.w_bk"]
    result = dst.load_state_dict(broken, strict=False)
    assert result.missing_keys == ["layers.1.attn.w_bk"]
    with pytest.raises(RuntimeError, match="layers.1.attn.w_bk"):
        dst.load_state_dict(broken)
    wrong = src.state_dict()
    wrong["layers.0.attn.w_bv"] = torch.zeros(3, c.d_model)
    with pytest.raises(RuntimeError, match="size mismatch for layers.0.attn.w_bv"):
        dst.load_state_dict(wrong)
    extra = src.state_dict()
    extra["layers.0.attn.w_zz"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="w_zz"):
        dst.load_state_dict(extra)


def test_assign_load_keeps_values(helpers):
    """load_state_dict(assign=True) (meta-device loading) yields the same forward."""
    c = helpers.tiny_config("fixed")
    src = helpers.random_model(c, seed=6)
    with torch.device("meta"):
        dst = TPAModel(c)
    dst.load_state_dict(src.state_dict(), assign=True)
    tokens = torch.randint(0, c.vocab_size, (2, 6))
    with torch.inference_mode():
        assert torch.equal(src(tokens), dst(tokens))


def test_bad_configs_name_the_field(helpers):
    with pytest.raises(TPAError, match="qkv_bias"):
        helpers.tiny_config("contextual", qkv_bias=True)
    with pytest.raises(TPAError, match="k_rank"):
        helpers.tiny_config("fixed", k_rank=4, v_rank=4)  # 4 does not divide 6 heads


@pytest.mark.parametrize("rows", [1, 15, 16, 97])
def test_linear_matches_f_linear(rows):
    """The oneDNN route for many rows computes what F.linear computes (float32 rounding apart)."""
    from tpa_core.attention import linear

    torch.manual_seed(rows)
    x, w, b = torch.randn(1, rows, 48), torch.randn(80, 48), torch.randn(80)
    with torch.inference_mode():
        for bias in (None, b):
            got, want = linear(x, w, bias), torch.nn.functional.linear(x, w, bias)
            assert got.shape == (1, rows, 80)
            assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("intel", [True, False])
def test_prefill_projection_library_follows_the_cpu_vendor(monkeypatch, intel):
    """Intel CPUs keep MKL (F.linear) for prefill projections; others try oneDNN. Both give F.linear's values."""
    from tpa_core import attention as attention_module

    monkeypatch.setattr(attention_module, "_intel_cpu", lambda: intel)
    monkeypatch.setitem(attention_module._onednn, "usable", None)
    x, w = torch.randn(2, 20, 48), torch.randn(40, 48)
    with torch.no_grad():
        out = attention_module.linear(x, w)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    if intel:
        assert attention_module._onednn["usable"] is False
    else:  # oneDNN used wherever this torch build has it
        assert attention_module._onednn["usable"] is torch.backends.mkldnn.is_available()
