"""The answer benchmark's scorer on fixed answers, and its question sets against their sources."""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_scoring():
    """benchmarks/answer_scoring.py by its path: benchmarks/ on sys.path would shadow the `retrieval` package."""
    spec = importlib.util.spec_from_file_location("answer_scoring", ROOT / "benchmarks" / "answer_scoring.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_scoring = _load_scoring()
PARTIAL, RIGHT, WRONG = _scoring.PARTIAL, _scoring.RIGHT, _scoring.WRONG
check_set, contains, holds_answer = _scoring.check_set, _scoring.contains, _scoring.holds_answer
load_set, normalize, score, split, wilson = (_scoring.load_set, _scoring.normalize, _scoring.score, _scoring.split,
                                             _scoring.wilson)


def test_normalize_ignores_case_quotes_backticks_and_whitespace():
    assert normalize("  The `DEFAULT`\n  width is \"70\"  ") == "the default width is 70"


@pytest.mark.parametrize(("answer", "expected", "verdict"), [
    ("The default width is 70 [1].", ["70"], RIGHT),
    ("Use `heapq.nlargest(n, data)`.", ["nlargest"], RIGHT),
    ("It uses QUOTE_MINIMAL quoting", ["quote_minimal"], RIGHT),
    ("The width is 170.", ["70"], WRONG),  # a number inside a longer number is not the number
    ("It exits with code 127", ["2"], WRONG),
    ("Set _FOO_COMPLETE=bash_source", ["_COMPLETE"], RIGHT),
    ("The soft keywords are match and case.", [["match", "case"]], RIGHT),
    ("The soft keyword is match.", [["match", "case"]], PARTIAL),
    ("No idea.", [["match", "case"]], WRONG),
    ("It is max_size=0", ["max_size=0", "0"], RIGHT),  # any alternative suffices
    ("The separator is a comma.", ["item_separator"], WRONG),
    ("The item separator is ', ' [1].", [", "], RIGHT),  # punctuation alone counts only where set apart
    ("It uses a comma, by default.", [","], WRONG),
    ("The delimiter is `,`.", [","], RIGHT),
    ("Comment prefixes are # and ; by default.", [["#", ";"]], RIGHT),
    ("The placeholder is [...]", ["[...]"], RIGHT),
    ("It shows a placeholder...", ["..."], WRONG),
])
def test_score_on_fixed_answers(answer, expected, verdict):
    assert score(answer, expected) == verdict


def test_contains_needs_a_non_empty_expected_string():
    assert not contains("anything", "  ")


def test_holds_answer_is_literal():
    assert holds_answer("def wrap(text, width=70, **kwargs):", ["70"])
    assert not holds_answer("def wrap(text):", ["70"])
    assert holds_answer("softkwlist = ['_', 'case', 'match']", [["match", "case"]])


def test_split_is_deterministic_and_disjoint():
    items = [{"id": str(i)} for i in range(7)]
    tuning, held_out = split(items)
    assert [i["id"] for i in tuning] == ["0", "2", "4", "6"] and [i["id"] for i in held_out] == ["1", "3", "5"]


def test_wilson_interval():
    low, high = wilson(10, 20)
    assert low == pytest.approx(0.299, abs=1e-3) and high == pytest.approx(0.701, abs=1e-3)
    assert wilson(0, 0) == (0.0, 0.0)


def test_check_set_reports_answers_missing_from_their_file(tmp_path):
    (tmp_path / "mod.py").write_text("WIDTH = 70\n")
    items = [{"id": "a", "question": "q", "answers": ["70"], "file": "mod.py"},
             {"id": "b", "question": "q", "answers": [["WIDTH", "80"]], "file": "mod.py"},
             {"id": "c", "question": "q", "answers": ["x"], "file": "../outside.py"}]
    problems = check_set(items, tmp_path)
    assert problems == ["b: '80' not in mod.py", f"c: no file ../outside.py under {tmp_path.resolve()}"]


def test_load_set_refuses_duplicate_ids(tmp_path):
    path = tmp_path / "set.json"
    path.write_text('[{"id": "a", "question": "q", "answers": ["x"], "file": "f"},'
                    ' {"id": "a", "question": "q", "answers": ["y"], "file": "f"}]')
    with pytest.raises(ValueError, match="duplicate id"):
        load_set(path)


@pytest.mark.parametrize(("name", "root"), [
    ("cpython_extractive", Path(sysconfig.get_paths()["stdlib"])),
    ("click_extractive", None),
])
def test_question_sets_hold_their_answers(name, root):
    if root is None:
        click = pytest.importorskip("click")
        root = Path(click.__file__).parent
    items = load_set(ROOT / "benchmarks" / "questions" / f"{name}.json")
    assert len(items) >= 30
    assert check_set(items, root) == []


def test_load_set_reads_the_chunk_reuse_form(tmp_path):
    path = tmp_path / "set.json"
    path.write_text('{"description": "d", "questions": [{"q": "Width?", "file": "m.py", "must_contain": ["70"]},'
                    ' {"q": "Both?", "file": "m.py", "must_contain": ["match", "case"], "evidence": "e"}]}')
    items = load_set(path, prefix="cpy")
    assert items == [{"id": "cpy-001", "question": "Width?", "answers": [["70"]], "file": "m.py"},
                     {"id": "cpy-002", "question": "Both?", "answers": [["match", "case"]], "file": "m.py"}]
    assert score("It is match.", items[1]["answers"]) == PARTIAL
    path.write_text('{"questions": [{"q": "Width?", "file": "m.py"}]}')
    with pytest.raises(ValueError, match="must_contain"):
        load_set(path)
