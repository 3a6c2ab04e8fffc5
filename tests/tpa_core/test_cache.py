"""FactorCache: layout, growth, truncate, and bit-exact export/import (exact equality, the memory-movement rule)."""

from __future__ import annotations

import pytest
import torch

from tpa_core.cache import FactorCache, nbytes_per_token
from tpa_core.config import T6_PRESETS, TPAConfig
from tpa_core.errors import TPAError


def _filled(helpers, form: str, lens: list[int], capacity: int = 4, dtype=torch.float32) -> FactorCache:
    """A cache whose rows hold random factors (distinct per layer, row and position) of the given lengths."""
    config = helpers.tiny_config(form, n_layers=3)
    cache = FactorCache(config, batch_size=len(lens), capacity=capacity, dtype=dtype)
    torch.manual_seed(len(lens))
    for b, n in enumerate(lens):
        cache.reserve(n)
        for i in range(config.n_layers):
            cache.write(i, {name: torch.randn(1, n, *shape).to(dtype) for name, shape in cache.shapes.items()},
                        [0], slice(b, b + 1))
        cache.advance(n, slice(b, b + 1))
    return cache


def test_layout_matches_the_interface(helpers, form):
    config = helpers.tiny_config(form)
    cache = FactorCache(config, batch_size=2, capacity=8)
    H, D, RK, RV = config.n_heads, config.head_dim, config.k_rank, config.v_rank
    want = {"bk": (RK, D), "bv": (RV, D)}
    if config.contextual_kv:
        want.update(ak=(H, RK), av=(H, RV))
    assert cache.shapes == want
    for name, shape in want.items():
        assert cache.storage[name].shape == (config.n_layers, 2, 8, *shape)
        view = cache.layer(1)[name]
        assert view.shape == (2, 8, *shape) and view.stride(-1) == 1
        assert view.data_ptr() == cache.storage[name][1].data_ptr()  # a view, not a copy
    assert cache.lengths.dtype == torch.int32 and cache.lengths.tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_import_round_trip_is_exact(helpers, form, dtype):
    src = _filled(helpers, form, [13, 6], dtype=dtype)
    exported = src.export(0, 2, 11)
    assert len(exported) == 3 * len(src.names)
    for key, value in exported.items():
        assert value.device.type == "cpu" and value.is_contiguous() and value.shape[0] == 9
        _, i, name = key.split(".")
        assert torch.equal(value, src.storage[name][int(i), 0, 2:11]), key
    dst = FactorCache(src.config, batch_size=2, capacity=2, dtype=dtype)
    dst.import_(src.export(0, 0, 2), seq=1, at=0)  # piecewise: a prefix, then the exported range
    assert dst.import_(exported, seq=1, at=2) == 11
    assert dst.length(1) == 11 and dst.length(0) == 0
    assert dst.lengths.tolist() == [0, 11]
    again = dst.export(1, 0, 11)
    for key, value in src.export(0, 0, 11).items():
        assert torch.equal(again[key], value), key


def test_export_is_a_copy(helpers):
    cache = _filled(helpers, "contextual", [5])
    exported = cache.export(0, 0, 5)
    before = {k: v.clone() for k, v in exported.items()}
    with torch.inference_mode():  # the storage is made of inference tensors
        for store in cache.storage.values():
            store.fill_(7.0)
    for key in exported:
        assert torch.equal(exported[key], before[key])


def test_growth_preserves_contents(helpers, form):
    cache = _filled(helpers, form, [3, 4], capacity=4)
    snapshot = {b: cache.export(b, 0, cache.length(b)) for b in range(2)}
    ptr = cache.storage["bk"].data_ptr()
    cache.reserve(4)  # fits: nothing moves
    assert cache.storage["bk"].data_ptr() == ptr and cache.capacity == 4
    cache.reserve(9)
    assert cache.capacity == 16  # doubled until it fits
    for b in range(2):
        for key, value in cache.export(b, 0, cache.length(b)).items():
            assert torch.equal(value, snapshot[b][key]), key
    assert cache.lengths.tolist() == [3, 4]
    cache.reserve(cache.config.max_position_embeddings - 5)
    assert cache.capacity == cache.config.max_position_embeddings  # doubling stops at the context window


def test_truncate_and_errors(helpers):
    cache = _filled(helpers, "fixed", [8, 2])
    cache.truncate(0, 5)
    assert cache.length(0) == 5 and cache.lengths.tolist() == [5, 2]
    with pytest.raises(TPAError, match="truncate"):
        cache.truncate(0, 6)
    with pytest.raises(TPAError, match="export"):
        cache.export(1, 0, 3)
    with pytest.raises(TPAError, match="sequence 2"):
        cache.length(2)
    good = cache.export(0, 0, 5)
    with pytest.raises(TPAError, match="gap"):
        cache.import_(good, seq=1, at=3)
    with pytest.raises(TPAError, match="missing"):
        cache.import_({k: v for k, v in good.items() if not k.startswith("layers.2.")}, seq=1, at=0)
    with pytest.raises(TPAError, match="dtype"):
        cache.import_({k: v.double() for k, v in good.items()}, seq=1, at=0)
    bad = dict(good, **{"layers.0.bk": good["layers.0.bk"][:, :1]})
    with pytest.raises(TPAError, match="layers.0.bk"):
        cache.import_(bad, seq=1, at=0)
    short = dict(good, **{"layers.1.bv": good["layers.1.bv"][:3]})
    with pytest.raises(TPAError, match="tokens"):
        cache.import_(short, seq=1, at=0)
    assert cache.lengths.tolist() == [5, 2]  # failed imports change nothing
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]


def test_bytes_per_token_match_the_paper():
    """T6-124M (H 34, D 64, R_K = R_V = 2): 784 bytes per token and layer in bf16; a GQA-2 model stores 2 G D."""
    t6 = TPAConfig.from_t6_config(dict(vocab_size=50304, n_layer=12, n_head=34, head_dim=64, n_embd=768, rank=2,
                                       q_rank=6, block_size=1024))
    assert nbytes_per_token(t6, torch.bfloat16) == 784 * 12
    assert FactorCache(t6, capacity=1, dtype=torch.bfloat16).nbytes_per_token() == 784 * 12
    for name, per_layer in zip(T6_PRESETS, (784, 888, 1000, 1136)):  # the paper's table
        preset = TPAConfig.t6_preset(name)
        assert nbytes_per_token(preset, torch.bfloat16) == per_layer * preset.n_layers, name
        assert TPAConfig.t6_preset(name, kv_only=True).form == "kv_only"
    with pytest.raises(TPAError, match="unknown T6 preset"):
        TPAConfig.t6_preset("t6-7b")
    gqa = TPAConfig(vocab_size=10, d_model=64, n_layers=1, n_heads=8, head_dim=64, k_rank=2, v_rank=2,
                    mlp_hidden=8, contextual_kv=False)
    assert nbytes_per_token(gqa, torch.bfloat16) == 2 * 2 * 64 * 2 == gqa.cache_bytes_per_token(2)


def test_cache_grown_during_inference_is_usable_anywhere(helpers):
    """Storage that grew inside the model (inference mode) can be imported into and truncated outside it."""
    config = helpers.tiny_config("contextual")
    model = helpers.random_model(config)
    cache = model.new_cache(capacity=2)
    model(torch.randint(0, config.vocab_size, (1, 9)), cache)  # grows 2 -> 16 inside the model
    exported = cache.export(0, 0, 9)
    cache.truncate(0, 4)
    cache.import_({k: v[4:] for k, v in exported.items()}, seq=0, at=4)
    assert cache.length(0) == 9
    for key, value in cache.export(0, 0, 9).items():
        assert torch.equal(value, exported[key])
    value.add_(1.0)  # exports are ordinary tensors the caller owns
    with pytest.raises(TPAError, match="another model"):
        model(torch.zeros(1, 1, dtype=torch.long), FactorCache(config, dtype=torch.float64))
