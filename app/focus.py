"""Question-focused context: of each retrieved chunk, only the lines that share the question's words.

A small model is easily distracted by context it does not need (benchmarks/answers.py measures it); a chunk of
code or prose usually answers a question in one or two lines. `focus_units` keeps, of each chunk, the `lines`
lines whose words weigh most against the question (a word weighs more the fewer lines of the retrieved context
hold it; lines sharing no word are never kept), in their order in the chunk, with `...` where lines were left
out. Words are identifier parts: `max_retries`
and `maxRetries` both hold `max` and `retries`. A chunk with no line sharing a word keeps its first `lines` lines.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from app.context import ContextUnit

GAP = "..."
_WORD = re.compile(r"\w+", re.ASCII)
_CAMEL = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# Words too common in questions to point at a line.
STOPWORDS = frozenset(
    "the and for are was were what which who whom whose when where why how does did doing done has have had this that "
    "these those with from into onto than then its it's not but can could would should will shall may might must "
    "any all each every some such only also very there their them they you your yours our ours about above below "
    "over under again further once here both few more most other same own just now get gets set sets use used uses "
    "using value name called call calls function method class module file code return returns returned "
    "attribute argument parameter variable constant string number many much".split())


def words(text: str) -> set[str]:
    """The lower-case identifier parts of `text` of three or more characters, stopwords left out."""
    found: set[str] = set()
    for token in _WORD.findall(text):
        parts = {token.strip("_").lower()} | {p.lower() for piece in token.split("_") for p in _CAMEL.findall(piece)}
        found |= {p for p in parts if len(p) >= 3 and p not in STOPWORDS}
    return found


def focus_units(question: str, units: Sequence[ContextUnit], lines: int) -> list[ContextUnit]:
    """`units` with each one's text cut to its `lines` lines weighing most against `question` (module docstring);
    a unit of at most `lines` lines is kept whole."""
    if lines < 1:
        raise ValueError(f"a focused chunk keeps at least one line, not {lines}")
    wanted = words(question)
    split = [u.text.splitlines() for u in units]
    line_words = [[words(line) & wanted for line in chunk] for chunk in split]
    held = Counter(w for chunk in line_words for found in chunk for w in found)
    total = sum(len(chunk) for chunk in split) or 1
    weight = {w: math.log(1 + total / n) for w, n in held.items()}
    focused = []
    for unit, chunk, found in zip(units, split, line_words, strict=True):
        if len(chunk) <= lines:
            focused.append(unit)
            continue
        scores = [sum(weight[w] for w in f) for f in found]
        best = [i for i in sorted(range(len(chunk)), key=lambda i: (-scores[i], i))[:lines] if scores[i] > 0]
        keep = sorted(best) or list(range(lines))
        focused.append(replace(unit, text=_join(chunk, keep)))
    return focused


def _join(chunk: list[str], keep: list[int]) -> str:
    """The kept lines in order, `GAP` where lines between (or before or after) them were left out."""
    out: list[str] = [] if keep[0] == 0 else [GAP]
    for i, line in enumerate(keep):
        if i and line != keep[i - 1] + 1:
            out.append(GAP)
        out.append(chunk[line])
    if keep[-1] != len(chunk) - 1:
        out.append(GAP)
    return "\n".join(out)
