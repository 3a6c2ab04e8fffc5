"""The prompt of one ask: context units in a stable order, chat messages, and the overflow policy.

The prompt is `system (instructions + context), earlier turns, question`. The context is rendered in the order the
caller gives, never with scores or dates. The service gives the canonical order (collection, document path, chunk
index) for a session's first question and for pinned documents, so the same set of chunks always gives the same
token prefix. A unit belongs to the turn that brought it (`ContextUnit.turn`): the first turn's units sit in the
system message, a follow-up's new units in its own user message after the question, so everything the previous
prompt and answer held stays an exact prefix of the next prompt (see `app.service`).

Overflow policy (when the prompt and the answer budget do not fit the model's window), in this order:
1. earlier turns are left out, the oldest first, down to the latest one;
2. context units are left out: in retrieval mode the lowest-ranked chunk first (chunks kept from earlier turns
   rank below those retrieved for this question; then by score), in pinned mode from the end of the canonical
   order (so the cached prefix of the pinned documents stays the same from question to question);
3. the latest earlier turn is left out;
4. if the question alone still does not fit, the ask fails with a message saying by how much.
Then as much context as fits is given back, in order of preference (best rank first in retrieval mode, canonical
order in pinned mode): whole units where they fit; in pinned mode the first document that does not fit whole is
given back cut at a line boundary (and the rest stay out), in retrieval mode the best chunk is cut that way only
when no chunk fits whole. The context keeps its order. Everything left out is reported to the user.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from app.errors import AppError

SYSTEM_PROMPT = (
    "You are a helpful assistant for questions about the user's documents and code. "
    "Answer from the numbered context below. Cite the sources you use by their number, like [1]. "
    "If the context does not contain the answer, say so."
)

MessageList = list[dict[str, str]]

# Per-unit token estimates can be off by a few tokens where text joins (BPE merges across a boundary); a unit whose
# estimate exceeds the room by more than this is not worth an exact count.
_ESTIMATE_SLACK = 8


class ContextOverflowError(AppError):
    """Even the question alone does not fit the model's context window."""


@dataclass(frozen=True)
class ContextUnit:
    """A piece of context: a retrieved chunk, or a whole (pinned) document. Lines are 1-based and inclusive."""

    collection: str
    path: str
    chunk_index: int
    text: str
    start_line: int | None = None
    end_line: int | None = None
    score: float | None = None  # retrieval score; None for pinned documents (never rendered into the prompt)
    rank: float | None = None  # what the overflow policy keeps longest (default: the score); never rendered
    turn: int = 0  # the session turn (0-based) whose message holds it; 0 = the system message

    @property
    def priority(self) -> float:
        return self.rank if self.rank is not None else (self.score or 0.0)

    @property
    def sort_key(self) -> tuple[str, str, int]:
        return (self.collection, self.path, self.chunk_index)

    def label(self) -> str:
        if self.start_line is None:
            return self.path
        return f"{self.path} lines {self.start_line}-{self.end_line}"

    def source(self) -> dict:
        """The citation shown with an answer: {"path", "start_line", "end_line", "score", "text"}."""
        return {
            "path": self.path,
            "start_line": self.start_line,
            "end_line": self.end_line,
            "score": None if self.score is None else round(float(self.score), 4),
            "text": self.text,
        }

    def to_dict(self) -> dict:
        """What a turn records of its context, to rebuild it for the next question (`from_dict`)."""
        return {"collection": self.collection, "path": self.path, "chunk_index": self.chunk_index,
                "text": self.text, "start_line": self.start_line, "end_line": self.end_line, "score": self.score,
                "turn": self.turn}

    @classmethod
    def from_dict(cls, data: dict) -> ContextUnit:
        return cls(data["collection"], data["path"], int(data["chunk_index"]), data["text"], data.get("start_line"),
                   data.get("end_line"), data.get("score"), turn=int(data.get("turn") or 0))

    def head(self, n_lines: int) -> ContextUnit:
        """The first `n_lines` lines of this unit (the line range follows)."""
        lines = self.text.splitlines(keepends=True)[:n_lines]
        start = self.start_line if self.start_line is not None else 1
        return replace(self, text="".join(lines), start_line=start, end_line=start + len(lines) - 1)

    def n_lines(self) -> int:
        return len(self.text.splitlines())


SOURCE_FIELDS = ("path", "start_line", "end_line", "score")  # what a source shows outside the app (JSON, API)


def public_source(source: dict) -> dict:
    """A source (`ContextUnit.source`) as the JSON contract has it: path, line range and score, no text."""
    return {key: source.get(key) for key in SOURCE_FIELDS}


def canonical(units: Sequence[ContextUnit]) -> list[ContextUnit]:
    """Units in (collection, path, chunk index) order, duplicates removed."""
    seen: dict[tuple[str, str, int], ContextUnit] = {}
    for unit in units:
        seen.setdefault(unit.sort_key, unit)
    return [seen[key] for key in sorted(seen)]


def render_context(units: Sequence[ContextUnit], first: int = 1) -> str:
    """The numbered context block, in the order given (numbers follow it, from `first`).

    Each unit ends with one newline and the next starts with "[": byte-level BPE never merges across that
    boundary, so the tokens of a context are a prefix of the tokens of the same context with units appended
    (a blank line between units would become one "\n\n" token once something follows it)."""
    return "".join(f"[{number}] {unit.label()}\n{unit.text.rstrip()}\n" for number, unit in enumerate(units, first))


def build_messages(
    units: Sequence[ContextUnit], history: Sequence[tuple[str, str]], question: str, system: str = SYSTEM_PROMPT,
    first_turn: int = 0,
) -> MessageList:
    """Chat messages: system (instructions + context), earlier (question, answer) turns, the new question.

    `history` holds the session's turns `first_turn ..` (earlier ones were left out); the new question is turn
    `first_turn + len(history)`. A unit goes with the user message of its `turn` when that turn is a follow-up in
    the prompt (after the question: "question\n\nContext:\n\n[n] ..."), else into the system message. Units keep
    the order given within each message, and numbers run on through the messages."""
    current = first_turn + len(history)
    by_turn: dict[int, list[ContextUnit]] = {}
    for unit in units:
        by_turn.setdefault(_message_turn(unit, first_turn, current), []).append(unit)
    numbered = [1]

    def block(turn: int) -> str:
        chunk = by_turn.get(turn, [])
        text = render_context(chunk, numbered[0])
        numbered[0] += len(chunk)
        return text

    content = system
    if by_turn.get(0):
        content += "\n\nContext:\n\n" + block(0)
    messages: MessageList = [{"role": "system", "content": content}]

    def user(turn: int, asked: str) -> dict[str, str]:
        extra = block(turn) if turn and by_turn.get(turn) else ""
        return {"role": "user", "content": asked + ("\n\nContext:\n\n" + extra if extra else "")}

    for offset, (asked, answered) in enumerate(history):
        messages.append(user(first_turn + offset, asked))
        messages.append({"role": "assistant", "content": answered})
    messages.append(user(current, question))
    return messages


@dataclass
class FittedPrompt:
    """What goes into the prompt after the overflow policy, and what was left out (as text for the user)."""

    messages: MessageList
    units: list[ContextUnit]  # as rendered and numbered (`rendered_order`), less what was left out
    history: list[tuple[str, str]]
    prompt_tokens: int
    left_out: list[str] = field(default_factory=list)


def _message_turn(unit: ContextUnit, first_turn: int, current: int) -> int:
    """The turn whose user message holds `unit` (0: the system message, also for a turn left out)."""
    return unit.turn if max(first_turn, 1) <= unit.turn <= current else 0


def rendered_order(units: Sequence[ContextUnit], first_turn: int, n_history: int) -> list[ContextUnit]:
    """`units` in the order `build_messages` numbers them: the system message's, then each turn's."""
    current = first_turn + n_history
    return sorted(units, key=lambda u: _message_turn(u, first_turn, current))


def fit_prompt(
    units: Sequence[ContextUnit],
    history: Sequence[tuple[str, str]],
    question: str,
    *,
    count_tokens: Callable[[MessageList], int],
    budget: int,
    pinned: bool,
    system: str = SYSTEM_PROMPT,
) -> FittedPrompt:
    """Apply the overflow policy (module docstring) so that the prompt has at most `budget` tokens.

    `units` are in the order they are rendered in (duplicates by (collection, path, chunk index) are dropped).
    `count_tokens(messages)` is the exact token count of the rendered chat template; `budget` is the model's
    window less the tokens reserved for the answer.
    """
    seen: set[tuple[str, str, int]] = set()
    order: list[ContextUnit] = []
    for unit in units:
        if unit.sort_key not in seen:
            seen.add(unit.sort_key)
            order.append(unit)
    position = {u.sort_key: i for i, u in enumerate(order)}

    def presented(chosen: Sequence[ContextUnit]) -> list[ContextUnit]:
        return sorted(chosen, key=lambda u: position[u.sort_key])

    # `kept` is in order of preference: its last unit is the next to leave.
    kept = list(order) if pinned else sorted(order, key=lambda u: (-u.priority, position[u.sort_key]))
    turns = list(history)

    def messages_for(with_units: Sequence[ContextUnit], with_turns: Sequence[tuple[str, str]]) -> MessageList:
        return build_messages(presented(with_units), with_turns, question, system, len(history) - len(with_turns))

    def size(with_units: Sequence[ContextUnit], with_turns: Sequence[tuple[str, str]]) -> int:
        return count_tokens(messages_for(with_units, with_turns))

    total = size(kept, turns)
    if total <= budget:
        return FittedPrompt(messages_for(order, turns), rendered_order(order, 0, len(turns)), turns, total)

    dropped_turns = 0
    while len(turns) > 1 and size(kept, turns) > budget:
        turns.pop(0)
        dropped_turns += 1
    dropped: list[ContextUnit] = []  # in the order they were left out
    # A first pass on per-unit estimates, so that a context many times the window costs a few renders, not one
    # render per unit left out; the exact loop below finishes the job.
    empty = size([], [])
    cost = {u.sort_key: size([u], []) - empty for u in kept}
    estimate = size([], turns) + sum(cost.values())
    while len(kept) > 1 and estimate - cost[kept[-1].sort_key] > budget:
        estimate -= cost[kept[-1].sort_key]
        dropped.append(kept.pop())
    while kept and size(kept, turns) > budget:
        dropped.append(kept.pop())  # the lowest rank (retrieval) or the last in order (pinned)
    if turns and size(kept, turns) > budget:
        turns.pop(0)
        dropped_turns += 1
    total = size(kept, turns)
    if total > budget:
        raise ContextOverflowError(
            f"the question does not fit the model's context window: the prompt needs {total} tokens and "
            f"{budget} are available after reserving the answer; shorten the question or lower max new tokens"
        )

    # Give back as much context as fits, in order of preference (the reverse of the order of leaving out).
    cut_notes: list[str] = []
    for unit in reversed(dropped):
        room = budget - total
        if cost[unit.sort_key] <= room + _ESTIMATE_SLACK and size(kept + [unit], turns) <= budget:
            kept.append(unit)
            total = size(kept, turns)
            continue
        if pinned or not kept:
            n_fit = _max_lines_that_fit(unit, lambda part: size(kept + [part], turns) <= budget)
            if n_fit:
                part = unit.head(n_fit)
                kept.append(part)
                total = size(kept, turns)
                cut_notes.append(f"{unit.path} lines {part.end_line + 1}-{unit.end_line or unit.n_lines()}")
            if pinned:
                break  # pinned mode keeps a prefix of the canonical order

    left_out = []
    if dropped_turns:
        left_out.append(f"{dropped_turns} earlier turn{'s' if dropped_turns > 1 else ''} of this session")
    kept_keys = {u.sort_key for u in kept}
    left_out += [u.label() for u in presented(dropped) if u.sort_key not in kept_keys]
    left_out += cut_notes
    final = presented(kept)
    messages = messages_for(final, turns)
    final = rendered_order(final, len(history) - len(turns), len(turns))
    return FittedPrompt(messages, final, turns, count_tokens(messages), left_out)


def _max_lines_that_fit(unit: ContextUnit, fits: Callable[[ContextUnit], bool]) -> int:
    """The largest n < unit.n_lines() such that the unit's first n lines fit (0 if not even one line fits)."""
    lo, hi = 0, unit.n_lines() - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(unit.head(mid)):
            lo = mid
        else:
            hi = mid - 1
    return lo


def bound_pinned(units: Sequence[ContextUnit], max_chars: int) -> tuple[list[ContextUnit], list[str]]:
    """At most `max_chars` characters of pinned units (in their order), so an ask never tokenizes more text than
    could fit the window: whole units while they fit, then the first that does not cut at a line boundary, and
    the rest left out. Returns the units kept and a note for each part left out."""
    kept: list[ContextUnit] = []
    left_out: list[str] = []
    room = max_chars
    why = f"past the {max_chars:,}-character bound on pinned text"
    for unit in units:
        if room >= len(unit.text):
            kept.append(unit)
            room -= len(unit.text)
            continue
        n_lines = 0
        if room > 0:
            used = 0
            for line in unit.text.splitlines(keepends=True):
                if used + len(line) > room:
                    break
                used += len(line)
                n_lines += 1
        if n_lines:
            part = unit.head(n_lines)
            kept.append(part)
            left_out.append(f"{unit.path} lines {part.end_line + 1}-{unit.end_line or unit.n_lines()} ({why})")
        else:
            left_out.append(f"{unit.label()} ({why})")
        room = 0
    return kept, left_out
