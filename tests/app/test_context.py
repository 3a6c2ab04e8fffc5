"""The prompt's context: canonical order (stable prefix), nothing volatile, and the stated overflow policy."""

from __future__ import annotations

import pytest

from app.context import ContextOverflowError, ContextUnit, build_messages, canonical, fit_prompt, render_context


def words(messages) -> int:
    """A real, exact token count for these tests: whitespace-separated words of the rendered messages."""
    return sum(len(m["role"].split()) + len(m["content"].split()) for m in messages)


def unit(path, index, n_words=10, score=None, lines=None, collection="c"):
    if lines:
        text = "".join(f"{path} line {i} " + "w " * (n_words - 3) + "\n" for i in range(lines))
        return ContextUnit(collection, path, index, text, 1, lines, score)
    return ContextUnit(collection, path, index, " ".join(["w"] * n_words), index * 10 + 1, index * 10 + 9, score)


def test_canonical_order_gives_the_same_prefix_for_the_same_set():
    a, b, c = unit("b.py", 2, score=0.9), unit("a.md", 0, score=0.1), unit("b.py", 0, score=0.5)
    first = build_messages(canonical([a, b, c]), [], "q?")
    second = build_messages(canonical([c, a, b, a]), [], "q?")
    assert first == second
    assert [u.path for u in canonical([a, b, c])] == ["a.md", "b.py", "b.py"]
    text = render_context(canonical([a, b, c]))
    assert text.index("[1] a.md") < text.index("[2] b.py lines 1-9") < text.index("[3] b.py lines 21-29")
    assert "0.9" not in text and "0.5" not in text  # scores never enter the prefix


def test_fits_without_loss():
    units = [unit("a", 0, score=0.3), unit("b", 0, score=0.7)]
    fitted = fit_prompt(units, [("q1", "a1")], "q2", count_tokens=words, budget=10_000, pinned=False)
    assert fitted.left_out == [] and fitted.history == [("q1", "a1")]
    assert [u.path for u in fitted.units] == ["a", "b"]
    assert fitted.prompt_tokens == words(fitted.messages)


def test_retrieval_overflow_drops_old_turns_then_lowest_scores():
    units = [unit("low", 0, 100, 0.1), unit("high", 0, 100, 0.9), unit("mid", 0, 100, 0.5)]
    history = [("old question " * 20, "old answer " * 20), ("recent q", "recent a")]
    full = words(build_messages(units, history, "now?"))
    no_old = words(build_messages(units, history[1:], "now?"))
    # Room for all three chunks but not for the old turn: only the old turn goes.
    fitted = fit_prompt(units, history, "now?", count_tokens=words, budget=no_old, pinned=False)
    assert fitted.history == history[1:] and len(fitted.units) == 3
    assert fitted.left_out == ["1 earlier turn of this session"]
    assert full > no_old
    # Room for two chunks: the lowest-scored one goes and is named.
    fitted = fit_prompt(units, history, "now?", count_tokens=words, budget=no_old - 50, pinned=False)
    assert sorted(u.path for u in fitted.units) == ["high", "mid"]
    assert fitted.left_out == ["1 earlier turn of this session", "low lines 1-9"]
    assert fitted.prompt_tokens <= no_old - 50


def test_pinned_overflow_keeps_a_canonical_prefix_and_cuts_at_a_line():
    docs = [unit("c.md", 0, 10, lines=20), unit("a.md", 0, 10, lines=20), unit("b.md", 0, 10, lines=20)]
    empty = words(build_messages([], [], "q?"))
    one_doc = words(build_messages(docs[1:2], [], "q?")) - empty
    budget = empty + one_doc + one_doc // 2  # a.md whole, about half of b.md, no c.md
    fitted = fit_prompt(canonical(docs), [], "q?", count_tokens=words, budget=budget, pinned=True)
    assert [u.path for u in fitted.units] == ["a.md", "b.md"]
    cut = fitted.units[1]
    assert 1 <= cut.end_line < 20 and cut.text.count("\n") == cut.end_line
    assert fitted.left_out == ["c.md lines 1-20", f"b.md lines {cut.end_line + 1}-20"]
    assert fitted.prompt_tokens <= budget
    # One line more would not have fitted: the cut is the longest that fits.
    longer = docs[2].head(cut.end_line + 1)
    longer = ContextUnit("c", "b.md", 0, longer.text.replace("c.md", "b.md"), 1, cut.end_line + 1)
    assert words(build_messages([fitted.units[0], longer], [], "q?")) > budget


def test_question_alone_too_long_is_an_error_naming_the_sizes():
    with pytest.raises(ContextOverflowError, match=r"needs \d+ tokens and 20 are available"):
        fit_prompt([unit("a", 0)], [("q", "a")], "word " * 200, count_tokens=words, budget=20, pinned=False)


def test_many_times_the_window_is_reduced_with_few_renders():
    calls = []

    def counting(messages):
        calls.append(1)
        return words(messages)

    units = [unit(f"f{i:03d}", 0, 50, score=i / 300) for i in range(300)]
    fitted = fit_prompt(units, [], "q?", count_tokens=counting, budget=400, pinned=False)
    assert 1 <= len(fitted.units) <= 8 and fitted.prompt_tokens <= 400
    assert fitted.units[-1].path == "f299"  # the best scores stay
    assert len(fitted.left_out) == 300 - len(fitted.units)
    assert len(calls) < 340  # one estimate per unit, then a handful of exact renders


def test_presentation_order_is_kept_and_earlier_turns_units_leave_first():
    from dataclasses import replace

    old = [replace(unit("z-old", 0, 100, 0.9), rank=-1.0), replace(unit("y-old", 0, 100, 0.8), rank=-1.001)]
    new = [unit("b-new", 0, 100, 0.2), unit("a-new", 0, 100, 0.6)]
    units = old + new  # the previous turn's context first, then this question's chunks
    fitted = fit_prompt(units, [], "q?", count_tokens=words, budget=10_000, pinned=False)
    assert [u.path for u in fitted.units] == ["z-old", "y-old", "b-new", "a-new"]
    room_for_three = words(build_messages(units[:3], [], "q?"))
    fitted = fit_prompt(units, [], "q?", count_tokens=words, budget=room_for_three, pinned=False)
    assert [u.path for u in fitted.units] == ["z-old", "b-new", "a-new"]  # y-old ranks lowest
    assert fitted.left_out == ["y-old lines 1-9"]
    room_for_two = words(build_messages(units[:2], [], "q?"))
    fitted = fit_prompt(units, [], "q?", count_tokens=words, budget=room_for_two, pinned=False)
    assert [u.path for u in fitted.units] == ["b-new", "a-new"]
