"""tpa_core.tokenizer: GGUF and HF tokenizers equal transformers' (ids, text, chat template), save/load, errors."""

from __future__ import annotations

import json

import pytest
from engine_fixtures import CHATML_TEMPLATE, tiny_vocab, write_tiny_gguf, write_tokenizer_files

from tpa_core.errors import TPAError
from tpa_core.gguf import GGUFFile
from tpa_core.tokenizer import Tokenizer

TEXTS = [
    "the thing is in the wall",
    "  leading spaces\n\n\tand tabs   ",
    "Digits 12345 and 3.14159, 1,000,000!",
    "<|im_start|>user\nhi<|im_end|>\n",
    "unicode: héllo wörld 日本語 😀",
    "it's we'll they've I'M",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is in the wall?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and then?"}],
]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def ours(tiny_gguf):
    return Tokenizer.from_gguf_metadata(GGUFFile(tiny_gguf).metadata)


@pytest.fixture(scope="module")
def theirs(tiny_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_equal_transformers(ours, theirs, text):
    ids = ours.encode(text)
    assert ids == theirs(text).input_ids
    assert ours.decode(ids) == theirs.decode(ids) == text


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(ours, theirs, conversation, add_generation_prompt):
    text = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(conversation, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    ids = theirs.apply_chat_template(conversation, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ours.encode_chat(conversation, add_generation_prompt) == list(ids)


def test_special_tokens_and_eos(ours):
    assert ours.bos_token == "<|im_start|>" and ours.bos_token_id == 1
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_ids == [2]
    assert ours.encode("<|im_end|>") == [2]  # a control token written in the text stays whole
    assert ours.vocab_size == len(tiny_vocab()[0])


def test_smollm_pre_tokenizer_splits_every_digit(ours):
    pieces = [p for p, _ in ours.backend.pre_tokenizer.pre_tokenize_str("a 123 b")]
    assert pieces == ["a", "Ġ", "1", "2", "3", "Ġb"]


def test_template_raise_exception_is_a_tpa_error(ours):
    with pytest.raises(TPAError, match="Unknown role: robot"):
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_no_template_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.gguf"
    write_tiny_gguf(path, chat_template=None)
    tok = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)
    with pytest.raises(TPAError, match="no chat template.*--raw"):
        tok.apply_chat_template(CONVERSATIONS[0])


def test_save_load_round_trip(ours, tmp_path):
    ours.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.meta() == ours.meta()
    assert again.chat_template == ours.chat_template
    assert again.fingerprint_text() == ours.fingerprint_text()
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text)


def test_from_hf_folder(tmp_path):
    write_tokenizer_files(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_ids == [2, 0]
    assert tok.apply_chat_template(CONVERSATIONS[0]).endswith("<|im_start|>assistant\n")
    assert tok.decode(tok.encode("the wall")) == "the wall"


def test_hf_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(TPAError, match="no tokenizer found"):
        Tokenizer.from_hf_folder(tmp_path)


def test_unsupported_gguf_tokenizers():
    tokens, types, merges = tiny_vocab()
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens}
    with pytest.raises(TPAError, match="unsupported tokenizer"):
        Tokenizer.from_gguf_metadata(meta)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "no-such-pre", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges}
    with pytest.raises(TPAError, match="unsupported pre-tokenizer"):
        Tokenizer.from_gguf_metadata(meta)
