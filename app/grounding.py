"""Does an answer's wording come from its sources? A check of the answer's key terms against the cited text.

Key terms are what a reader would copy from an answer about code: quoted or backticked strings, identifiers
that cannot be ordinary words (with an underscore, a dot between names, or camelCase), and numbers. A term the
question already contains is the user's, not the answer's claim, and is not checked. A term found in none of
the cited sources is reported: the user sees "not found in the cited sources" next to the answer.
`benchmarks/answers.py` measures how often this fires on right and on wrong answers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

MAX_TERMS = 20  # an answer's first terms are enough to judge it, and the check stays cheap for long answers
_CITATION = re.compile(r"\[\d+\]")
_QUOTED = re.compile(r"`([^`\n]{1,80})`|\"([^\"\n]{1,80})\"|(?<![A-Za-z])'([^'\n]{1,80})'(?![A-Za-z])")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")
_CAMEL = re.compile(r"[a-z][A-Z]")


def key_terms(answer: str, question: str = "") -> list[str]:
    """The answer's key terms in order of appearance, without duplicates and without the question's terms."""
    text = _CITATION.sub(" ", answer)
    found: list[str] = []
    for match in _QUOTED.finditer(text):
        term = next(g for g in match.groups() if g is not None).strip()
        if term:
            found.append(term)
    for match in _IDENTIFIER.finditer(text):
        word = match.group(0).rstrip(".")
        if "_" in word or "." in word or _CAMEL.search(word):
            found.append(word)
    found += [m.group(0) for m in _NUMBER.finditer(text)]
    unique: list[str] = []
    for term in found:
        if term not in unique and term not in question:
            unique.append(term)
    return unique[:MAX_TERMS]


def ungrounded_terms(answer: str, sources: Sequence[dict] | Iterable[str], question: str = "") -> list[str]:
    """The answer's key terms that occur in none of `sources` (source dicts with "text" and "path", or plain
    strings). A source's path counts as its text: an answer naming the cited file is grounded.

    Identifiers and strings must occur as written; a number must occur as a whole number (7 is not in 70)."""
    texts = [s if isinstance(s, str) else f"{s.get('path') or ''}\n{s.get('text') or ''}" for s in sources]
    missing = []
    for term in key_terms(answer, question):
        if term[0].isdigit() and _NUMBER.fullmatch(term):
            pattern = re.compile(rf"(?<![\w.]){re.escape(term)}(?![\w])")
            hit = any(pattern.search(t) for t in texts)
        else:
            hit = any(term in t for t in texts)
        if not hit:
            missing.append(term)
    return missing


def grounding_note(missing: Sequence[str], limit: int = 5) -> str:
    """What the user is told about `missing` terms ("" when there are none)."""
    if not missing:
        return ""
    shown = ", ".join(missing[:limit]) + (f" and {len(missing) - limit} more" if len(missing) > limit else "")
    return f"not found in the cited sources: {shown}"
