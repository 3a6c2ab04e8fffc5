"""RoPE: both conventions, the Llama-family scalings, against transformers and the official T6 formula."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tpa_core.config import TPAConfig
from tpa_core.errors import TPAError
from tpa_core.rope import Rope, apply_rope, inv_freq

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)


def _config(**kw) -> TPAConfig:
    base = dict(vocab_size=10, d_model=32, n_layers=1, n_heads=4, head_dim=32, k_rank=2, v_rank=2, mlp_hidden=8,
                contextual_kv=False, max_position_embeddings=256)
    base.update(kw)
    return TPAConfig(**base)


SCALINGS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "mscale": 1.0,
                    "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
}


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_rotate_half_matches_transformers(name):
    scaling = SCALINGS[name]
    hf_config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=1, head_dim=32, rope_theta=50000.0,
                                         max_position_embeddings=256, rope_scaling=scaling)
    rotary = LlamaRotaryEmbedding(hf_config)
    config = TPAConfig.from_hf_config(hf_config.to_dict())
    positions = torch.tensor([[0, 1, 7, 63, 64, 200], [5, 5, 100, 150, 254, 255]])
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 3, 32), torch.randn(2, 6, 2, 32)
    cos, sin = rotary(q, positions)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    tables = Rope(config).tables(positions)
    assert (apply_rope(q, tables) - want_q).abs().max().item() <= 1e-5
    assert (apply_rope(k, tables) - want_k).abs().max().item() <= 1e-5


def test_dynamic_ntk_matches_transformers_per_call_length():
    hf_config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=1, max_position_embeddings=64,
                                         rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    config = TPAConfig.from_hf_config(hf_config.to_dict())
    for length in (40, 64, 65, 100, 128):
        rotary = LlamaRotaryEmbedding(hf_config)  # fresh: transformers keeps the longest length seen
        positions = torch.arange(length)[None]
        x = torch.randn(1, length, 1, 32)
        cos, sin = rotary(x, positions)
        want, _ = apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=2)
        got = apply_rope(x, Rope(config).tables(positions))
        assert (got - want).abs().max().item() <= 1e-5, length
    base, _ = inv_freq(config)
    assert torch.equal(inv_freq(config, seq_len=64)[0], base)
    assert not torch.equal(inv_freq(config, seq_len=65)[0], base)


def test_t6_matches_the_official_formula():
    """y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos with bfloat16 tables, base 10000, positions from 0."""
    config = _config(rope_style="t6", rope_tables_bf16=True, head_dim=64)
    torch.manual_seed(0)
    x = torch.randn(1, 50, 3, 64)
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    freqs = torch.outer(torch.arange(50).float(), inv)
    cos, sin = freqs.cos().bfloat16()[None, :, None, :], freqs.sin().bfloat16()[None, :, None, :]
    x1, x2 = x[..., :32], x[..., 32:]
    want = torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3).type_as(x)
    got = apply_rope(x, Rope(config).tables(torch.arange(50)[None]))
    assert (got - want).abs().max().item() <= 1e-6


def test_t6_is_the_inverse_rotation_of_rotate_half():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4, 16)
    positions = torch.randint(0, 200, (2, 9))
    forward = apply_rope(x, Rope(_config(head_dim=16)).tables(positions))
    back = apply_rope(forward, Rope(_config(head_dim=16, rope_style="t6")).tables(positions))
    assert (back - x).abs().max().item() <= 1e-5
    assert (forward - x).abs().max().item() > 0.1


@pytest.mark.parametrize("style", ["rotate_half", "t6"])
def test_scores_depend_on_relative_position_only(style):
    rope = Rope(_config(head_dim=16, rope_style=style))
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, rope.tables(torch.tensor([[m]])))
        kn = apply_rope(k, rope.tables(torch.tensor([[n]])))
        return float((qm * kn).sum())

    assert score(10, 3) == pytest.approx(score(107, 100), abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


def test_scaling_validation_names_the_field():
    with pytest.raises(TPAError, match="factor"):
        _config(rope_scaling={"rope_type": "linear"})
    with pytest.raises(TPAError, match="longrope"):
        _config(rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(TPAError, match="rope_style"):
        _config(rope_style="neox")
    assert _config(rope_scaling={"type": "default"}).rope_scaling is None
    legacy = _config(rope_scaling={"type": "linear", "factor": 2.0})
    assert legacy.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert dataclasses.replace(legacy).rope_scaling == legacy.rope_scaling
