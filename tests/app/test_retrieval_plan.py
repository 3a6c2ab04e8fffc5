"""The per-model retrieval default, and that an explicit top-k or budget wins over it."""

from __future__ import annotations

import pytest

from app.errors import AppError
from app.retrieval_plan import (
    BUDGET_CANDIDATES,
    DEFAULT_TOP_K,
    RetrievalPlan,
    choose_plan,
    model_default,
    within_budget,
)
from app.settings import Settings


def test_every_model_size_gets_the_measured_default():
    assert model_default(135_000_000) == RetrievalPlan(DEFAULT_TOP_K, None, "model")
    assert model_default(7_000_000_000) == RetrievalPlan(DEFAULT_TOP_K, None, "model")


def test_an_explicit_top_k_wins_over_the_model_and_the_budget():
    assert choose_plan(135_000_000, 7, None) == RetrievalPlan(7, None, "top-k")
    assert choose_plan(135_000_000, 7, 100) == RetrievalPlan(7, None, "top-k")
    assert choose_plan(7_000_000_000, None, 100) == RetrievalPlan(BUDGET_CANDIDATES, 100, "budget")
    with pytest.raises(ValueError, match="positive integer"):
        choose_plan(1, None, 0)


def test_within_budget_keeps_the_best_that_fit_and_always_the_first():
    sizes = {"a": 200, "b": 150, "c": 90, "d": 40}
    assert within_budget(list("abcd"), sizes.get, 320) == ["a", "c"]  # b does not fit after a; c and d do
    assert within_budget(list("abcd"), sizes.get, 330) == ["a", "c", "d"]
    assert within_budget(list("abcd"), sizes.get, 10) == ["a"]  # never no context at all
    assert within_budget([], sizes.get, 10) == []


def test_settings_leave_top_k_to_the_model_unless_given():
    assert Settings.from_env({}, data_dir="/tmp/x").top_k is None
    settings = Settings.from_env({"TPA_RAG_TOP_K": "4", "TPA_RAG_CONTEXT_TOKENS": "256"}, data_dir="/tmp/x")
    assert (settings.top_k, settings.context_tokens) == (4, 256)


def _long_corpus(folder, n=8):
    folder.mkdir()
    for i in range(n):
        (folder / f"part{i}.md").write_text(f"# Part {i}\n\n" + f"The factor cache stores page {i}. " * 40 + "\n")
    return folder


def test_the_service_uses_the_model_default_and_top_k_overrides_it(make_service, tmp_path):
    service = make_service(top_k=None)
    service.ingest_paths("long", [str(_long_corpus(tmp_path / "long"))])
    assert service.retrieval_plan() == RetrievalPlan(DEFAULT_TOP_K, None, "model")
    assert len(service.ask("What does the factor cache store?", "long").sources) == DEFAULT_TOP_K
    tokens = service.loaded.tokenizer.encode
    budget = service.ask("What does the factor cache store?", "long", options=service.options(context_tokens=200))
    assert 1 <= len(budget.sources) < BUDGET_CANDIDATES
    assert sum(len(tokens(s["text"])) for s in budget.sources[1:]) <= 200
    explicit = service.ask("What does the factor cache store?", "long", options=service.options(top_k=6))
    assert len(explicit.sources) == 6
    tight = service.ask("What does the factor cache store?", "long", options=service.options(context_tokens=1))
    assert len(tight.sources) == 1
    with pytest.raises(AppError, match="positive integer"):
        service.ask("What does the factor cache store?", "long", options=service.options(context_tokens=-3))


def test_settings_top_k_wins_over_the_model_default(make_service, tmp_path):
    service = make_service(top_k=2)
    service.ingest_paths("long", [str(_long_corpus(tmp_path / "long"))])
    assert service.retrieval_plan().source == "top-k"
    assert len(service.ask("What does the factor cache store?", "long").sources) == 2


def test_relevance_order_puts_the_best_chunk_last(make_service, tmp_path):
    service = make_service(top_k=3)
    service.ingest_paths("long", [str(_long_corpus(tmp_path / "long"))])
    result = service.ask("page 5", "long", options=service.options(context_order="relevance"))
    scores = [s["score"] for s in sorted(result.sources, key=lambda s: s["ref"])]
    assert scores == sorted(scores)
    with pytest.raises(AppError, match="context order"):
        service.ask("page 5", "long", options=service.options(context_order="random"))
