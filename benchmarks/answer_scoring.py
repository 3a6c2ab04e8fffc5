"""Scoring answers against fixed expected strings, and the question sets' format and split.

A question set is a JSON list of {"id", "question", "answers", "file"}. `answers` lists alternatives, any one of
which makes an answer right; an alternative is a string, or a list of strings that must all occur (an answer with
some but not all of them is partially right). Every expected string occurs literally in `file` (`check_set`).
The chunk-reuse benchmark's form, {"questions": [{"q", "file", "must_contain", ...}]}, is read too: its
`must_contain` is one all-of alternative, and its ids are the positions (`<prefix>-001`, ...).

Matching ignores case, quotes and backticks, and runs of whitespace; an expected string must stand on its own
(an expected "2" is not found in "127", "nlargest" is found in "heapq.nlargest(n, data)", "_COMPLETE" in
"_FOO_COMPLETE": letters and digits only count as a word's inside). An expected string of punctuation alone
(",", ", ", "...") occurs in almost any sentence, so it counts only where the answer sets it apart: quoted,
backticked, bracketed or between spaces ("the delimiter is ','", not "a, b").
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

RIGHT, PARTIAL, WRONG = "right", "partial", "wrong"
_QUOTES = str.maketrans("", "", "'\"`\u2018\u2019\u201c\u201d")


def normalize(text: str) -> str:
    """Lower case, quotes and backticks removed, whitespace runs made one space."""
    return " ".join(text.translate(_QUOTES).casefold().split())


_SET_APART_LEFT = r"(?:^|(?<=[\s'\"`(\[\u2018\u201c]))"
_SET_APART_RIGHT = r"(?=$|[\s'\"`)\]\u2019\u201d])"


def contains(answer: str, expected: str) -> bool:
    """Whether normalized `expected` occurs in normalized `answer`, not inside a longer word or number (an
    expected string of punctuation alone: set apart in the answer as written, see the module docstring)."""
    needle = normalize(expected)
    if not needle:
        return False
    if not any(ch.isalnum() for ch in expected):
        pattern = _SET_APART_LEFT + re.escape(expected.casefold()) + _SET_APART_RIGHT
        return re.search(pattern, answer.casefold()) is not None
    left = r"(?<![^\W_])" if re.match(r"[^\W_]", needle) else ""
    right = r"(?![^\W_])" if re.search(r"[^\W_]$", needle) else ""
    return re.search(left + re.escape(needle) + right, normalize(answer)) is not None


def _alternatives(answers: list) -> list[list[str]]:
    return [[alt] if isinstance(alt, str) else list(alt) for alt in answers]


def score(answer: str, answers: list) -> str:
    """RIGHT if some alternative is fully present, PARTIAL if some part of an all-of alternative is, else WRONG."""
    best = WRONG
    for parts in _alternatives(answers):
        found = sum(contains(answer, part) for part in parts)
        if found == len(parts):
            return RIGHT
        if found:
            best = PARTIAL
    return best


def holds_answer(text: str, answers: list) -> bool:
    """Whether a source text holds some alternative literally (all of its parts)."""
    return any(all(part in text for part in parts) for parts in _alternatives(answers))


def load_set(path: str | Path, prefix: str = "q") -> list[dict]:
    """A question set, each entry checked for its keys; ids must be unique. `prefix` names the ids of a set in the
    chunk-reuse benchmark's form."""
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(items, dict) and isinstance(items.get("questions"), list):
        items = [_from_must_contain(item, f"{prefix}-{position:03d}", path)
                 for position, item in enumerate(items["questions"], start=1)]
    if not isinstance(items, list):
        raise ValueError(f"{path}: a question set is a JSON list, or an object with a 'questions' list")
    seen: set[str] = set()
    for item in items:
        missing = {"id", "question", "answers", "file"} - set(item)
        if missing:
            raise ValueError(f"{path}: question {item.get('id')!r} lacks {sorted(missing)}")
        if item["id"] in seen:
            raise ValueError(f"{path}: duplicate id {item['id']!r}")
        seen.add(item["id"])
    return items


def _from_must_contain(item: dict, question_id: str, path: str | Path) -> dict:
    missing = {"q", "file", "must_contain"} - set(item)
    if missing:
        raise ValueError(f"{path}: question {question_id} lacks {sorted(missing)}")
    return {"id": question_id, "question": item["q"], "answers": [list(item["must_contain"])], "file": item["file"]}


def check_set(items: list[dict], root: str | Path) -> list[str]:
    """Problems with a set against its source tree under `root`: files outside it or missing, answers not in them."""
    root = Path(root).resolve()
    problems = []
    for item in items:
        path = (root / item["file"]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            problems.append(f"{item['id']}: no file {item['file']} under {root}")
            continue
        text = path.read_text(encoding="utf-8")
        for parts in _alternatives(item["answers"]):
            problems += [f"{item['id']}: {part!r} not in {item['file']}" for part in parts if part not in text]
    return problems


def split(items: list[dict]) -> tuple[list[dict], list[dict]]:
    """(tuning, held-out): the questions at odd positions of the set, then those at even positions (1-based)."""
    return items[0::2], items[1::2]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))
