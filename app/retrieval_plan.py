"""How much retrieved context an ask gets: the per-model default and the user's explicit choice.

A small model is easily distracted by context it does not need, so the default is a token budget for the
retrieved chunks chosen from the model's size (`benchmarks/answers.py` measures the effect on answer accuracy;
the README has the table). An explicit top-k (`--top-k`, `TPA_RAG_TOP_K`, the UI's slider) always wins: a fixed
number of chunks, no budget. An explicit context budget (`TPA_RAG_CONTEXT_TOKENS`) replaces the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

# Models below this many parameters get the small-model budget (the default model, SmolLM2-135M, has 135M).
SMALL_MODEL_PARAMS = 500_000_000
SMALL_MODEL_CONTEXT_TOKENS = 320
# Chunks retrieved before a budget picks among them; also the fixed count for larger models (not measured yet:
# today's default of 5 chunks is kept for them).
BUDGET_CANDIDATES = 8
LARGE_MODEL_TOP_K = 5

T = TypeVar("T")


@dataclass(frozen=True)
class RetrievalPlan:
    """`top_k` chunks are retrieved; where `context_tokens` is set, the best of them that fit it are kept."""

    top_k: int
    context_tokens: int | None = None
    source: str = "model"  # "model" (the per-model default) | "top-k" (explicit) | "budget" (explicit budget)


def model_default(n_params: int) -> RetrievalPlan:
    """The default for a model of `n_params` parameters."""
    if n_params < SMALL_MODEL_PARAMS:
        return RetrievalPlan(BUDGET_CANDIDATES, SMALL_MODEL_CONTEXT_TOKENS, "model")
    return RetrievalPlan(LARGE_MODEL_TOP_K, None, "model")


def choose_plan(n_params: int, top_k: int | None, context_tokens: int | None) -> RetrievalPlan:
    """An explicit `top_k` wins (a fixed count); else an explicit `context_tokens`; else the model's default."""
    if top_k is not None:
        return RetrievalPlan(top_k, None, "top-k")
    if context_tokens is not None:
        if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 1:
            raise ValueError(f"the context token budget must be a positive integer, got {context_tokens!r}")
        return RetrievalPlan(BUDGET_CANDIDATES, context_tokens, "budget")
    return model_default(n_params)


def within_budget(ranked: Sequence[T], cost: Callable[[T], int], budget: int) -> list[T]:
    """The best-ranked items (in the order given) whose summed `cost` fits `budget`; the first item always stays,
    so a question never goes without context because its best chunk is long. An item that does not fit is
    skipped and a smaller one after it may still be taken."""
    kept: list[T] = []
    used = 0
    for item in ranked:
        size = cost(item)
        if kept and used + size > budget:
            continue
        kept.append(item)
        used += size
    return kept
