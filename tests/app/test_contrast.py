"""Context-aware decoding through the ask path: the option, its checks, and the contrast prompt the model gets."""

from __future__ import annotations

import pytest

import tpa_core.generate
from app.asking import system_prompt
from app.errors import AppError


@pytest.fixture
def service(make_service, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.md").write_text("The build cache lives in ~/.cache/tpa-rag/ops.\n\nRetries default to 0.\n")
    service = make_service(top_k=2)
    service.ingest_paths("docs", [str(folder)])
    return service


@pytest.fixture
def calls(monkeypatch):
    """The (prompt_ids, config, contrast_ids) of every generation the service runs."""
    seen = []
    original = tpa_core.generate.generate

    def spy(model, tokenizer, prompt_ids, config, cache=None, seq=0, contrast_ids=None):
        seen.append((list(prompt_ids), config, contrast_ids))
        return original(model, tokenizer, prompt_ids, config, cache=cache, seq=seq, contrast_ids=contrast_ids)

    monkeypatch.setattr(tpa_core.generate, "generate", spy)
    return seen


def test_the_contrast_prompt_is_the_prompt_without_its_context(service, calls):
    question = "Where does the build cache live?"
    service.ask(question, "docs", options=service.options(contrast=0.5))
    prompt_ids, config, contrast_ids = calls[-1]
    tokenizer = service.loaded.tokenizer
    options = service.options(contrast=0.5)
    bare = tokenizer.encode_chat([{"role": "system", "content": system_prompt(options)},
                                  {"role": "user", "content": question}])
    assert config.contrast == 0.5 and contrast_ids == bare
    assert len(prompt_ids) > len(bare) and "~/.cache/tpa-rag/ops" in tokenizer.decode(prompt_ids)


def test_without_the_option_decoding_is_plain(service, calls):
    service.ask("Where does the build cache live?", "docs")
    _, config, contrast_ids = calls[-1]
    assert config.contrast == 0.0 and contrast_ids is None


@pytest.mark.parametrize("weight", [-0.5, 11, True, "1"])
def test_a_contrast_weight_out_of_range_is_refused(service, weight):
    with pytest.raises(AppError, match="contrast weight must be a number from 0"):
        service.ask("Where does the build cache live?", "docs", options=service.options(contrast=weight))
