"""tpa_core.loading: GGUF and HF folders load with transformers' logits, the model cache and its fingerprint,
and a clear TPAError for every bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from engine_fixtures import random_hf_llama_state, tiny_vocab, write_tiny_gguf, write_tokenizer_files

from tpa_core import loading
from tpa_core.errors import TPAError
from tpa_core.loading import cached_dir_for, load_model, resolve_source

transformers = pytest.importorskip("transformers")
TOL = 1e-4  # the acceptance bound for float32 parity with transformers
IDS = [[4, 80, 200, 17, 1, 99, 260, 33, 5, 140, 71]]


def _hf_logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float()


def _our_logits(loaded, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(torch.tensor(ids))


@pytest.mark.parametrize("arch, qtype", [("llama", "Q4_1"), ("qwen2", "Q8_0")])
def test_gguf_loads_with_transformers_logits(tmp_path, arch, qtype):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, arch=arch, qtype=qtype)
    loaded = load_model(path, tmp_path / "models", device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert (_our_logits(loaded) - _hf_logits(hf)).abs().max().item() < TOL
    assert re.fullmatch(r"[0-9a-f]{64}", loaded.fingerprint)
    assert loaded.cache_dir == tmp_path / "models" / loaded.fingerprint
    assert {p.name for p in loaded.cache_dir.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json",
                                                            "tokenizer_meta.json", "chat_template.jinja"}
    assert loaded.tokenizer.eos_token_ids == [2] and loaded.chat_template == loaded.tokenizer.chat_template
    assert loaded.name == "tiny" and loaded.context_window == 64


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, qtype="Q8_0")
    first = load_model(path, tmp_path / "models", device="cpu")
    assert cached_dir_for(resolve_source(path, tmp_path / "models"), tmp_path / "models") == first.cache_dir

    def no_conversion(source):
        raise AssertionError("the second load converted the source again")

    monkeypatch.setattr(loading, "convert_source", no_conversion)
    second = load_model(str(path), tmp_path / "models", device="cpu")
    assert second.fingerprint == first.fingerprint
    assert torch.equal(_our_logits(second), _our_logits(first))
    assert second.tokenizer.fingerprint_text() == first.tokenizer.fingerprint_text()


def test_sixteen_bit_load_holds_norm_weights_in_float32(tmp_path):
    """A bf16 load (converted, then from the cache): matrices bf16, norm weights float32 (tpa_core.model)."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, qtype="Q8_0")
    for _ in range(2):
        loaded = load_model(path, tmp_path / "models", device="cpu", dtype=torch.bfloat16)
        for name, p in loaded.model.named_parameters():
            assert p.dtype == (torch.float32 if "norm" in name else torch.bfloat16), name
        assert loaded.dtype == torch.bfloat16 and _our_logits(loaded).dtype == torch.float32


def test_fingerprint_covers_weights_and_chat_template(tmp_path):
    models = tmp_path / "models"
    write_tiny_gguf(tmp_path / "a.gguf", seed=0)
    write_tiny_gguf(tmp_path / "b.gguf", seed=1)
    write_tiny_gguf(tmp_path / "c.gguf", seed=0, chat_template="{{ messages[0]['content'] }}")
    write_tiny_gguf(tmp_path / "d.gguf", seed=0)
    fa, fb, fc, fd = (load_model(tmp_path / f"{n}.gguf", models, device="cpu").fingerprint for n in "abcd")
    assert len({fa, fb, fc}) == 3
    assert fd == fa  # same content in another file: same fingerprint, one cache entry
    assert len(loading.list_cached(models)) == 3


def test_changed_source_file_is_converted_again(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, seed=0)
    first = load_model(path, tmp_path / "models", device="cpu")
    write_tiny_gguf(path, seed=5)
    second = load_model(path, tmp_path / "models", device="cpu")
    assert second.fingerprint != first.fingerprint


def test_damaged_cache_is_rebuilt_from_the_source(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    first = load_model(path, tmp_path / "models", device="cpu")
    expected = _our_logits(first)
    (first.cache_dir / "model.safetensors").write_bytes(b"\x00" * 100)
    again = load_model(path, tmp_path / "models", device="cpu")
    assert again.fingerprint == first.fingerprint
    assert torch.equal(_our_logits(again), expected)


def _save_hf_folder(folder, arch: str):
    vocab = len(tiny_vocab()[0])
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    config = cls[0](vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = cls[1](config).eval()
    model.load_state_dict(random_hf_llama_state(vocab, qkv_bias=arch == "qwen2", tied=False, seed=7))
    model.save_pretrained(folder)
    write_tokenizer_files(folder)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_folder_loads_with_transformers_logits(tmp_path, arch):
    hf = _save_hf_folder(tmp_path / "hf", arch)
    loaded = load_model(tmp_path / "hf", tmp_path / "models", device="cpu")
    assert loaded.config.arch == arch and loaded.config.qkv_bias == (arch == "qwen2")
    assert (_our_logits(loaded) - _hf_logits(hf)).abs().max().item() < TOL
    assert loaded.tokenizer.eos_token_ids == [2]


# ----- bad input -------------------------------------------------------------------------------------------
def test_unknown_model_name(tmp_path):
    with pytest.raises(TPAError, match="unknown model 'no-such-model'.*smollm2-135m-instruct"):
        load_model("no-such-model", tmp_path / "models")


def test_missing_path(tmp_path):
    with pytest.raises(TPAError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"), tmp_path / "models")


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(TPAError, match="not a GGUF file"):
        load_model(path, tmp_path / "models")


def test_truncated_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(TPAError, match="GGUF"):
        load_model(path, tmp_path / "models")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TPAError, match="no config.json"):
        load_model(tmp_path / "empty", tmp_path / "models")


def test_unsupported_architecture_folder(tmp_path):
    folder = tmp_path / "neox"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(TPAError, match="unsupported architecture.*gpt_neox"):
        load_model(folder, tmp_path / "models")


def test_plain_gpt2_folder_is_unsupported_not_t6(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8}))
    with pytest.raises(TPAError, match="unsupported architecture.*gpt2"):
        load_model(folder, tmp_path / "models")


def test_damaged_safetensors_in_hf_folder(tmp_path):
    _save_hf_folder(tmp_path / "hf", "llama")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(TPAError, match="not a readable safetensors"):
        load_model(tmp_path / "hf", tmp_path / "models")


def test_weights_that_do_not_fit_the_config(tmp_path):
    _save_hf_folder(tmp_path / "hf", "llama")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), num_hidden_layers=3)))
    with pytest.raises(TPAError, match="lacks the weight"):
        load_model(tmp_path / "hf", tmp_path / "models")


def test_unknown_device(tmp_path):
    with pytest.raises(TPAError, match="unknown device"):
        load_model("smollm2-135m-instruct", tmp_path / "models", device="tpu", fetch=False)


def test_known_model_not_fetched_without_fetch(tmp_path):
    with pytest.raises(TPAError, match="models fetch"):
        load_model("smollm2-135m-instruct", tmp_path / "models", device="cpu", fetch=False)


@pytest.mark.parametrize("fast", [True, False])
def test_bfloat16_hf_weights_stay_bfloat16_where_the_cpu_multiplies_them_fast(tmp_path, monkeypatch, fast):
    from tpa_core.quant import ops

    hf = _save_hf_folder(tmp_path / "hf", "llama")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf")  # config.json: "bfloat16" weights
    _save_hf_folder(tmp_path / "hf32", "llama")  # float32 weights
    monkeypatch.setattr(ops, "fast_bf16_gemm", lambda: fast)
    loaded = load_model(tmp_path / "hf", tmp_path / "models", device="cpu")
    assert loaded.dtype == (torch.bfloat16 if fast else torch.float32)
    assert {p.dtype for p in loaded.model.parameters() if p.dim() == 2} == {loaded.dtype}  # the matrices
    assert load_model(tmp_path / "hf32", tmp_path / "models", device="cpu").dtype == torch.float32
    # the bfloat16 weights computed in float32 (a reloaded model: `hf.float()` would keep bf16-rounded RoPE buffers)
    reference = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32))
    assert (_our_logits(loaded).float() - reference).abs().max().item() < (5e-2 if fast else TOL)
