"""How much retrieved context an ask gets: the per-model default and the user's explicit choice.

The default is chosen from the model's size by what `benchmarks/answers.py` measured on answer accuracy (the
README has the table): a model size class gets another amount of context only where a setting beat 5 chunks on
the held-out questions. An explicit top-k (`--top-k`, `TPA_RAG_TOP_K`, the UI's slider) always wins: a fixed
number of chunks, no budget. An explicit context budget (`TPA_RAG_CONTEXT_TOKENS`) replaces the model's default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

# For small models (SmolLM2-135M) a 320-token budget and 1, 2 or 3 chunks were measured; none beat 5 chunks on
# both sets (benchmarks/RESULTS.md), so every model keeps DEFAULT_TOP_K until a setting does.
BUDGET_CANDIDATES = 8  # chunks retrieved before a budget picks among them
DEFAULT_TOP_K = 5

T = TypeVar("T")


@dataclass(frozen=True)
class RetrievalPlan:
    """`top_k` chunks are retrieved; where `context_tokens` is set, the best of them that fit it are kept."""

    top_k: int
    context_tokens: int | None = None
    source: str = "model"  # "model" (the per-model default) | "top-k" (explicit) | "budget" (explicit budget)


def model_default(n_params: int) -> RetrievalPlan:
    """The default for a model of `n_params` parameters: the setting measured best for its size class. Today that is
    5 chunks for every size (no smaller context beat it for the 135M default model)."""
    del n_params  # every size class measured so far has the same best setting
    return RetrievalPlan(DEFAULT_TOP_K, None, "model")


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
