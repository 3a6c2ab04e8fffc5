"""tpa_core.gguf: metadata, dequantized tensors, the Q/K row un-permutation, damaged and unsupported files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_fixtures import TINY, llama_cpp_permute, write_tiny_gguf

from tpa_core.errors import TPAError
from tpa_core.gguf import GGUFFile, hf_name, permute_rows, unpermute_rows


@pytest.mark.parametrize("n_heads, head_dim, cols", [(4, 16, 64), (3, 64, 7), (1, 2, 1), (9, 64, 0)])
def test_unpermute_inverts_llama_cpp_permutation(n_heads, head_dim, cols):
    g = torch.Generator().manual_seed(n_heads)
    shape = (n_heads * head_dim, cols) if cols else (n_heads * head_dim,)  # a weight or a bias
    w = torch.randn(*shape, generator=g)
    stored = torch.from_numpy(llama_cpp_permute(w.numpy(), n_heads))
    assert torch.equal(unpermute_rows(stored, n_heads), w)
    assert torch.equal(permute_rows(w, n_heads), stored)
    if head_dim > 2:
        assert not torch.equal(stored, w)


def test_unpermute_rejects_odd_rows():
    with pytest.raises(TPAError, match="un-permute"):
        unpermute_rows(torch.zeros(6, 4), 4)


def test_hf_names():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None


def test_f32_llama_file_round_trips_exactly(tmp_path):
    path = tmp_path / "tiny.gguf"
    original = write_tiny_gguf(path, arch="llama", qtype="F32", tied=False)
    gguf = GGUFFile(path)
    assert gguf.architecture == "llama"
    assert gguf.metadata["llama.block_count"] == TINY["layers"]
    state = gguf.hf_state_dict()
    assert set(state) == set(original)
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name
    config = gguf.hf_config()
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is False
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["max_position_embeddings"] == TINY["context"]
    assert config["vocab_size"] == original["model.embed_tokens.weight"].shape[0]


@pytest.mark.parametrize("arch, qtype", [("llama", "Q4_1"), ("llama", "Q8_0"), ("qwen2", "F32"), ("qwen2", "Q8_0")])
def test_hf_view_equals_transformers_gguf_loader(tmp_path, arch, qtype):
    """Our dequantized, un-permuted weights are bit-identical to what transformers loads from the same file."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, arch=arch, qtype=qtype)
    ours = GGUFFile(path).hf_state_dict()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    theirs = model.state_dict()
    if model.config.tie_word_embeddings:
        theirs.pop("lm_head.weight")
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_quantized_tensors_are_close_to_the_originals(tmp_path):
    path = tmp_path / "q.gguf"
    original = write_tiny_gguf(path, qtype="Q8_0")
    state = GGUFFile(path).hf_state_dict()
    w = original["model.layers.1.self_attn.q_proj.weight"]
    err = (state["model.layers.1.self_attn.q_proj.weight"] - w).abs().max()
    assert 0 < err < 0.01 * w.abs().max()  # Q8_0: 8-bit blocks, not bit-exact, but close


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(TPAError, match="not a readable GGUF|damaged"):
        GGUFFile(path).hf_state_dict()


def test_a_file_cut_inside_the_vocabulary_is_a_clear_error(tmp_path):
    """The metadata's token list (an array of strings) ends past the end of the file: refused, not read past."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    cut = data.index(b"tokenizer.ggml.tokens") + 200  # inside the token strings
    for size in (cut, cut + 3):  # in a length prefix and in a string's bytes
        path.write_bytes(data[:size])
        with pytest.raises(TPAError, match="not a readable GGUF"):
            GGUFFile(path)


def test_garbage_after_magic_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + bytes(np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8)))
    with pytest.raises(TPAError, match="not a readable GGUF"):
        GGUFFile(path)


def test_missing_file(tmp_path):
    with pytest.raises(TPAError, match="not found"):
        GGUFFile(tmp_path / "nope.gguf")


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "gptneox")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TPAError, match="unsupported architecture.*gptneox"):
        GGUFFile(path).hf_config()


def test_rope_freqs_tensor_is_refused(tmp_path):
    path = tmp_path / "l31.gguf"
    write_tiny_gguf(path, extra_tensors={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    with pytest.raises(TPAError, match="rope_freqs"):
        GGUFFile(path).hf_config()


def test_our_ggml_type_table_agrees_with_the_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from tpa_core.ggml_types import GGML_TYPES

    theirs = {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}
    ours = {type_id: tuple(fields) for type_id, fields in GGML_TYPES.items()}
    assert {i: ours[i] for i in theirs.keys() & ours.keys()} == {i: theirs[i] for i in theirs.keys() & ours.keys()}
    assert theirs.keys() <= ours.keys(), "a GGML type the gguf package knows is missing from tpa_core.ggml_types"
