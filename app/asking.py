"""The steps of one ask as plain functions: check the request, plan the prompt, measure the answer.

`ChatService` strings them together (`app.service`): `resolve_options` turns per-ask options and the settings into
checked values (`check_sampling` is the part a plain chat shares); `plan_prompt` lays out the context, fits it to
the window and encodes it (an `AskPlan`, nothing run yet); `answer_metrics` is the metrics dict an answer reports.
None of them touches the model worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from app.context import SYSTEM_PROMPT, ContextUnit, build_messages, canonical, fit_prompt, render_context
from app.errors import AppError
from app.tokens import encode_conversation

MAX_QUESTION_CHARS = 8_000
MAX_TOP_K = 50
CONTEXT_ORDERS = ("canonical", "relevance")


class QuestionError(AppError):
    """An empty or oversized question."""


@dataclass(frozen=True)
class AskOptions:
    """Per-ask settings; None = the service's settings. `documents`: pinned mode's documents (None = the
    session's selection, else the whole collection). `top_p`, `seed`, `stop`: sampling and stop strings as in
    `tpa_core.generate.GenerationConfig`. `instructions`: the caller's own instructions, appended to the
    system prompt of a collection chat. `chunk_reuse`: assemble the retrieved chunks from their chunk caches
    (None = the settings' choice). `top_k` None (and none in the settings): the model's default amount of context
    (`app.retrieval_plan`); `context_tokens`: a token budget for the retrieved chunks instead; `context_order`:
    "canonical" (document order, exact prefix reuse) or "relevance" (the best chunk last, nearest the question);
    `hybrid`: dense and full-text retrieval; `context_focus`: keep only this many question-relevant lines of each
    retrieved chunk (`app.focus`; None or 0: whole chunks); `contrast`: context-aware decoding's weight
    (`tpa_core.generate`; None or 0: off), against the same prompt without its context."""

    top_k: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    documents: tuple[str, ...] | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    instructions: str = ""
    chunk_reuse: bool | None = None
    context_tokens: int | None = None
    context_order: str | None = None
    hybrid: bool = False
    context_focus: int | None = None
    contrast: float | None = None


@dataclass(frozen=True)
class ResolvedOptions:
    """`AskOptions` with every value decided and checked. `top_k` and `context_tokens` None: the model decides
    (`ChatService.retrieval_plan`, which needs the loaded model)."""

    top_k: int | None
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    chunk_reuse: bool | None  # None: where it pays on the model's device (`app.chunk_reuse.reuse_pays_on`)
    context_tokens: int | None = None
    context_order: str = "canonical"
    hybrid: bool = False
    context_focus: int = 0  # lines kept per retrieved chunk; 0: whole chunks
    contrast: float = 0.0  # context-aware decoding's weight; 0: off


@dataclass
class AskPlan:
    """The prompt of one ask, laid out and encoded: what the model worker runs.

    `boundaries`: prompt lengths worth a cache entry of their own (the ends of the shared system prompt and of
    the context). `spans`: the chunks of the context as token ranges of `prompt_ids` (empty where the context
    does not tokenize piecewise)."""

    prompt_ids: list[int]
    units: list[ContextUnit]
    sources: list[dict]
    left_out: list[str]
    kept_turns: int
    boundaries: list[int] = field(default_factory=list)
    spans: list[ChunkSpan] = field(default_factory=list)
    contrast_ids: list[int] = field(default_factory=list)  # the prompt without its context (context-aware decoding)


@dataclass(frozen=True)
class ChunkSpan:
    """One context unit in the prompt's tokens: `prefix` tokens of shared system prompt come before every
    context; the unit's cacheable tokens are `[start, end)` (its header less the citation number `[n]`, which
    depends on the unit's place, and its text)."""

    prefix: int
    start: int
    end: int


def check_question(question: str) -> str:
    """The question stripped; raises `QuestionError` when it is empty or too long."""
    question = (question or "").strip()
    if not question:
        raise QuestionError("the question is empty; type a question first")
    if len(question) > MAX_QUESTION_CHARS:
        raise QuestionError(f"the question is too long ({len(question):,} characters; at most "
                            f"{MAX_QUESTION_CHARS:,}); shorten it, or ingest the text as a document")
    return question


def check_top_k(top_k: Any) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise AppError(f"top-k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
    return top_k


def check_context_tokens(budget: Any) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise AppError(f"the context token budget must be a positive integer, got {budget!r}")
    return budget


def check_sampling(options: AskOptions, settings: Any) -> tuple[int, float]:
    """(max new tokens, temperature) of `options` or the settings; top-p and stop strings checked too."""
    max_new = int(options.max_new_tokens if options.max_new_tokens is not None else settings.max_new_tokens)
    temperature = float(options.temperature if options.temperature is not None else settings.temperature)
    if max_new < 1:
        raise AppError(f"max new tokens must be at least 1, got {max_new}")
    if not temperature >= 0:
        raise AppError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if options.top_p is not None and not 0 < options.top_p <= 1:
        raise AppError(f"top-p must be in (0, 1], got {options.top_p}")
    if any(not isinstance(stop, str) for stop in options.stop):
        raise AppError("stop strings must be strings")
    return max_new, temperature


def check_focus(lines: Any) -> int:
    """Lines kept per retrieved chunk: None or 0 (whole chunks) or a positive integer."""
    if lines is None:
        return 0
    if isinstance(lines, bool) or not isinstance(lines, int) or lines < 0:
        raise AppError(f"context focus must be a whole number of lines (0: whole chunks), got {lines!r}")
    return lines


def check_contrast(weight: Any) -> float:
    """Context-aware decoding's weight: None or 0 (off), or a number up to 10."""
    if weight is None:
        return 0.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 10:
        raise AppError(f"the contrast weight must be a number from 0 (off) to 10, got {weight!r}")
    return float(weight)


def resolve_options(options: AskOptions, settings: Any) -> ResolvedOptions:
    """Per-ask options over the settings' defaults, checked (no model needed: `check_window` comes later)."""
    top_k = options.top_k if options.top_k is not None else settings.top_k
    budget = options.context_tokens if options.context_tokens is not None else settings.context_tokens
    order = options.context_order or settings.context_order
    if order not in CONTEXT_ORDERS:
        raise AppError(f"the context order must be one of {', '.join(CONTEXT_ORDERS)}, got {order!r}")
    max_new, temperature = check_sampling(options, settings)
    reuse = options.chunk_reuse if options.chunk_reuse is not None else settings.chunk_reuse
    return ResolvedOptions(None if top_k is None else check_top_k(top_k), max_new, temperature,
                           options.top_p if options.top_p is not None else 1.0, options.seed, tuple(options.stop),
                           None if reuse is None else bool(reuse),
                           None if budget is None else check_context_tokens(budget), order, bool(options.hybrid),
                           check_focus(options.context_focus), check_contrast(options.contrast))


def check_window(max_new_tokens: int, window: int) -> None:
    """The answer must leave room for a prompt in the model's context `window`."""
    if max_new_tokens >= window:
        raise AppError(f"max new tokens ({max_new_tokens}) must be below the model's context window ({window})")


def system_prompt(options: AskOptions) -> str:
    """The system prompt of a collection chat: ours, then the caller's own instructions if any."""
    extra = options.instructions.strip()
    return SYSTEM_PROMPT + (f"\n\n{extra}" if extra else "")


def plan_prompt(tokenizer: Any, units: Sequence[ContextUnit], turns: Sequence[Any], question: str, *,
                hits: set, budget: int, pinned: bool, system: str = SYSTEM_PROMPT, contrast: bool = False) -> AskPlan:
    """Lay out and encode the prompt of an ask.

    `units`: the context in the order it is rendered (pinned documents, or the retrieved chunks in canonical
    order); `turns`: the earlier turns (`app.sessions.Turn`), oldest first; `hits`: the sort keys of the units
    this question chose (they become its sources); `budget`: the window less the answer's tokens; `system`: the
    system prompt (`system_prompt`); `contrast`: encode the same prompt without its context too
    (`AskPlan.contrast_ids`, for context-aware decoding).
    """
    history = [(t.question, t.answer) for t in turns]
    fitted = fit_prompt(units, history, question, count_tokens=lambda m: len(tokenizer.encode_chat(m)),
                        budget=budget, pinned=pinned, system=system)
    kept = turns[len(turns) - len(fitted.history):] if fitted.history else []
    spelled = {2 + 2 * i: t.answer_ids for i, t in enumerate(kept)}  # message index -> the answer's own ids
    prompt_ids = encode_conversation(tokenizer, fitted.messages, spelled)
    if len(prompt_ids) > budget:  # a generated spelling can be longer than the canonical one
        prompt_ids = tokenizer.encode_chat(fitted.messages)
    sources = [dict(u.source(), ref=number) for number, u in enumerate(fitted.units, start=1) if u.sort_key in hits]
    spans = [] if pinned else chunk_spans(tokenizer, fitted.messages, fitted.units, prompt_ids)
    # Entries of their own at the end of the shared system prompt (every new question starts with it) and at the
    # end of the context.
    boundaries = sorted({s.prefix for s in spans[:1]} | set(context_end(tokenizer, fitted.messages, fitted.units,
                                                                         prompt_ids)))
    contrast_ids = encode_conversation(tokenizer, build_messages([], fitted.history, question, system),
                                       spelled) if contrast else []
    return AskPlan(prompt_ids=prompt_ids, units=fitted.units, sources=sources, left_out=fitted.left_out,
                   kept_turns=len(kept), boundaries=boundaries, spans=spans, contrast_ids=contrast_ids)


def chunk_spans(tokenizer: Any, messages: list[dict[str, str]], units: Sequence[ContextUnit],
                prompt_ids: list[int]) -> list[ChunkSpan]:
    """Where each unit's cacheable tokens sit in `prompt_ids` (`units` in rendered order). A unit whose cuts are
    not token boundaries is left out (its tokens are prefilled); [] when the shared prefix's end is not one."""
    if not units:
        return []
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    tokens_to = _boundary_counter(tokenizer, full, prompt_ids)
    pieces: list[tuple[int, int, int]] = []  # (piece start, body start, body end) in characters
    offset = 0
    for number, unit in enumerate(units, start=1):
        piece = render_context([unit], number)  # "[n] label\ntext\n"
        at = full.find(piece, offset)
        if at < 0:
            return []
        offset = at + len(piece)
        pieces.append((at, at + len(f"[{number}]"), offset))
    # The shared prefix ends at the last token boundary before the first unit ("Context:\n\n" ends in one
    # "\n\n" token alone, but in "\n" "\n" before the context's "[").
    first = pieces[0][0]
    prefix = next((n for n in map(tokens_to, range(first, max(0, first - 8), -1)) if n is not None), None)
    if prefix is None:
        return []
    spans: list[ChunkSpan] = []
    for _, body_start, body_end in pieces:
        start, end = tokens_to(body_start), tokens_to(body_end)
        if start is not None and end is not None and end > start:
            spans.append(ChunkSpan(prefix, start, end))
    return spans


def context_end(tokenizer: Any, messages: list[dict[str, str]], units: Sequence[ContextUnit],
                prompt_ids: list[int]) -> list[int]:
    """[the number of prompt tokens up to the end of the system message's context], or [] where there is none or
    it is not a token boundary.

    The store keeps a tail entry there, so the next question on the same context (a new session) reuses all of
    it, not only its full 256-token pages."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    if not units or "\n\nContext:\n\n" not in system:
        return []
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    at = full.find(system)
    end = _boundary_counter(tokenizer, full, prompt_ids)(at + len(system)) if at >= 0 else None
    return [] if end is None else [end]


def _boundary_counter(tokenizer: Any, full: str, prompt_ids: list[int]) -> Any:
    """char -> the number of prompt tokens that spell `full[:char]`, or None where that is not a token boundary.

    `prompt_ids` spell `full`, earlier answers possibly with their generated ids (`app.tokens`), so a cut after
    such an answer is found from the end: the ids that follow it are then the canonical tokens of the rest."""

    def tokens_to(char: int) -> int | None:
        head = tokenizer.encode(full[:char], add_special_tokens=False)
        if prompt_ids[:len(head)] == head:
            return len(head)
        tail = tokenizer.encode(full[char:], add_special_tokens=False)
        return len(prompt_ids) - len(tail) if tail and prompt_ids[-len(tail):] == tail else None

    return tokens_to


def follow_up_context(earlier: list[ContextUnit], retrieved: list[ContextUnit], turn: int = 0) -> list[ContextUnit]:
    """The context of question number `turn` (0-based) of a session: the previous turn's context in place (its
    cached prefix stays valid), then the newly retrieved chunks in canonical order, marked as this turn's (they go
    with its question). A session's first question gets its chunks in canonical order, in the system message.

    Ranks for the overflow policy: this question's chunks by score, above every chunk kept from earlier turns
    (those leave from the end first, so the prefix that stays is the longest)."""
    current = {u.sort_key: u.score or 0.0 for u in retrieved}
    kept = [
        replace(u, rank=2.0 + current[u.sort_key]) if u.sort_key in current else replace(u, rank=-1.0 - 1e-3 * i)
        for i, u in enumerate(earlier)
    ]
    known = {u.sort_key for u in earlier}
    fresh = canonical([replace(u, rank=2.0 + (u.score or 0.0), turn=turn) for u in retrieved
                       if u.sort_key not in known])
    return kept + fresh


def relevance_order(units: Sequence[ContextUnit]) -> list[ContextUnit]:
    """A first question's context in relevance order, the best chunk last (nearest the question). Costs exact
    prefix reuse across sessions: the same chunks retrieved in another order give another prefix."""
    return sorted(units, key=lambda u: u.score or 0.0)


def answer_metrics(*, prompt_tokens: int, reuse: dict[str, int], t_start: float, t_first: float, t_last: float,
                   t_end: float, queued_s: float, n_new: int, prefill_ms: float | None, finish: str) -> dict:
    """The metrics of one answer. Times are `time.perf_counter()` readings; `queued_s`, the wait for the model
    worker, is not the ask's latency. `reuse`: where the prompt's tokens came from (`app.chunk_reuse.Restored`:
    reused_tokens from exact prefix pages, chunk_tokens from chunk caches, recomputed_tokens, prefilled_tokens)."""
    return {
        "prompt_tokens": prompt_tokens,
        **reuse,
        "ttft_ms": round((t_first - t_start - queued_s) * 1e3, 1),
        "decode_tokens_per_s": round((n_new - 1) / (t_last - t_first), 2) if n_new > 1 and t_last > t_first
        else 0.0,
        "total_ms": round((t_end - t_start - queued_s) * 1e3, 1),
        "new_tokens": n_new,
        "prefill_ms": None if prefill_ms is None else round(prefill_ms, 1),
        "queued_ms": round(queued_s * 1e3, 1),
        "finish_reason": finish,
    }

