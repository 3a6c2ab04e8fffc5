"""Chunk assembly: moving a cached B_K by rotation, and recomputing tokens against an assembled cache."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import write_tiny_gguf

from tpa_core.assembly import place, recompute, select_deviating
from tpa_core.errors import TPAError
from tpa_core.loading import load_model
from tpa_core.quant import ops

ROPES = {
    "plain": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


def _model(helpers, form: str, style: str, scaling) -> object:
    config = helpers.tiny_config(form, rope_style=style, rope_scaling=scaling, rope_tables_bf16=False)
    return helpers.random_model(config, seed=3)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("form", ["contextual", "fixed"])
@pytest.mark.parametrize("style", ["rotate_half", "t6"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_a_moved_chunk_equals_the_chunk_encoded_there(helpers, form, style, rope):
    """B_K of a chunk encoded at position 7 and moved to 141 equals B_K of the same chunk encoded at 141.

    Layer 0's B_K depends on the token and its position only, so there the two must agree to rounding; deeper
    layers also saw different predecessors (7 vs 141 filler tokens), so only the round trip is checked there."""
    model = _model(helpers, form, style, ROPES[rope])
    chunk = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(1))
    caches = {}
    for at in (7, 141):
        cache = model.new_cache(capacity=256)
        model(torch.full((1, at), 5), cache)
        model(chunk, cache)
        caches[at] = cache.export(0, at, at + 20)
    moved = place(model, caches[7], 141 - 7)
    assert _rel_err(moved["layers.0.bk"], caches[141]["layers.0.bk"]) <= 1e-4
    assert _rel_err(caches[7]["layers.0.bk"], caches[141]["layers.0.bk"]) > 1e-2  # the move did something
    for i in range(model.config.n_layers):
        for name in ("bv", "ak", "av"):
            if f"layers.{i}.{name}" in moved:  # head factors and B_V are never touched
                assert torch.equal(moved[f"layers.{i}.{name}"], caches[7][f"layers.{i}.{name}"])
    back = place(model, moved, -(141 - 7))
    assert _rel_err(back["layers.1.bk"], caches[7]["layers.1.bk"]) <= 1e-5


def test_dynamic_ntk_refuses_a_move(helpers):
    model = _model(helpers, "fixed", "rotate_half", {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(TPAError, match="dynamic NTK"):
        place(model, {"layers.0.bk": torch.zeros(3, 2, 16)}, 5)


@pytest.mark.parametrize("form", ["contextual", "kv_only", "fixed"])
def test_recomputing_every_token_is_a_full_prefill(helpers, form):
    """Chunks encoded alone, moved into place, then every chunk token recomputed: the next-token logits equal a
    full prefill's (float32, 1e-4 of the largest value)."""
    model = helpers.random_model(helpers.tiny_config(form, rope_tables_bf16=False), seed=4)
    assembled, approx, full = _assemble_and_recompute(model, vocab=101)
    assert _rel_err(assembled, full) <= 1e-4
    assert _rel_err(approx, full) > 1e-3  # without the recompute chunk b never saw chunk a


@pytest.mark.skipif(not ops.available(), reason="the quantized-weights op could not be built (no C++ compiler)")
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["float32-cache", "float16-cache"])
def test_recomputing_with_resident_quantized_weights_is_a_full_prefill(tmp_path, cache_dtype):
    """The same with a GGUF's matrices resident in their blocks (their float parameters are placeholders): the
    recompute goes through the blocks too. The tail's few rows run the integer decode product, the full prefill
    dequantized rows: the bound is looser. With the float16 cache resident models keep, the recomputed factors are
    rounded into it as a prefill rounds its own."""
    path = tmp_path / "tiny-q8_0.gguf"
    write_tiny_gguf(path, qtype="Q8_0")
    model = load_model(path, tmp_path / "models", device="cpu", weights="quantized").model
    model.cache_dtype = cache_dtype
    assembled, approx, full = _assemble_and_recompute(model, vocab=model.config.vocab_size)
    assert _rel_err(assembled, full) <= 1e-3  # 1e-5 here (float32); 3e-2 when the recompute skipped the blocks
    assert _rel_err(approx, full) > 10 * _rel_err(assembled, full)
    cache = model.new_cache(capacity=32)
    ids = list(range(3, 23))
    model(torch.tensor([ids]), cache)
    chosen, states = select_deviating(model, cache, ids[4:], list(range(4, 20)), 0.25)
    recompute(model, cache, [ids[p] for p in chosen], chosen, first_layer_states=states)
    assert len(chosen) == 4 and cache.storage["bk"].dtype == cache_dtype


def _assemble_and_recompute(model, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits after the recompute, logits of the assembled cache without it, logits of a full prefill) for a head,
    two chunks each encoded after the head alone, and a tail."""
    g = torch.Generator().manual_seed(2)
    head, a, b, tail = (torch.randint(0, vocab, (n,), generator=g).tolist() for n in (6, 11, 9, 5))
    full = model(torch.tensor([head + a + b + tail]), last_only=True)[0, -1]

    cache = model.new_cache(capacity=64)
    model(torch.tensor([head]), cache)
    for chunk in (a, b):  # each encoded after the shared head only, at the reference position len(head)
        scratch = model.new_cache(capacity=64)
        model(torch.tensor([head + chunk]), scratch)
        piece = scratch.export(0, len(head), len(head) + len(chunk))
        cache.import_(place(model, piece, cache.length(0) - len(head)), 0, cache.length(0))
    ids = a + b
    positions = list(range(len(head), len(head) + len(ids)))
    approx = model(torch.tensor([tail]), _copy(model, cache), last_only=True)[0, -1]
    recompute(model, cache, ids, positions)
    assembled = model(torch.tensor([tail]), cache, last_only=True)[0, -1]
    return assembled, approx, full


def test_selection_picks_the_requested_share(helpers):
    model = helpers.random_model(helpers.tiny_config("fixed"), seed=5)
    cache = model.new_cache(capacity=64)
    ids = torch.randint(0, 101, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    model(torch.tensor([ids]), cache)
    chosen, states = select_deviating(model, cache, ids[10:], list(range(10, 30)), 0.25)
    assert len(chosen) == 5 and chosen == sorted(chosen) and all(10 <= p < 30 for p in chosen)
    assert states.shape == (1, 5, model.config.d_model)
    assert select_deviating(model, cache, ids[10:], list(range(10, 30)), 0.0) == ([], None)


def _copy(model, cache):
    clone = model.new_cache(capacity=cache.capacity)
    clone.import_(cache.export(0, 0, cache.length(0)), 0, 0)
    return clone
