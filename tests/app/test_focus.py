"""Question-focused context (`app.focus`): which lines of a chunk an ask keeps, and the service's option."""

from __future__ import annotations

import pytest

from app.context import ContextUnit
from app.errors import AppError
from app.focus import GAP, focus_units, words

CODE = """import os


class HTTPAdapter:
    '''The built-in adapter.'''

    def __init__(self, pool_connections=10, max_retries=DEFAULT_RETRIES):
        self.pool = pool_connections

DEFAULT_RETRIES = 0
DEFAULT_POOLSIZE = 10"""


def _unit(text: str, index: int = 0) -> ContextUnit:
    return ContextUnit("c", "adapters.py", index, text, 1, text.count("\n") + 1, score=0.5)


def test_words_are_identifier_parts_without_stopwords():
    assert words("What is the default maxRetries of HTTP_adapter?") == {
        "default", "maxretries", "max", "retries", "http_adapter", "http", "adapter"}
    assert words("a an is of to") == set()


def test_the_lines_sharing_the_questions_rarest_words_are_kept_in_order():
    [focused] = focus_units("What is DEFAULT_RETRIES of the HTTPAdapter?", [_unit(CODE)], 3)
    # "httpadapter" is on one line, the three words of "DEFAULT_RETRIES" on two; "default" alone (the pool size's
    # line) and "adapter" alone (the docstring) weigh less
    assert focused.text == "\n".join([GAP, "class HTTPAdapter:", GAP,
                                      "    def __init__(self, pool_connections=10, max_retries=DEFAULT_RETRIES):",
                                      GAP, "DEFAULT_RETRIES = 0", GAP])
    assert (focused.path, focused.chunk_index, focused.start_line) == ("adapters.py", 0, 1)  # the same citation


def test_a_chunk_sharing_no_word_keeps_its_first_lines_and_a_short_one_stays_whole():
    short = _unit("one line\nanother")
    focused = focus_units("Where is the pool size set?", [_unit("a\nb\nc\nd"), short], 2)
    assert focused[0].text == "a\nb\n" + GAP and focused[1] is short


def test_a_line_count_below_one_is_refused():
    with pytest.raises(ValueError, match="at least one line"):
        focus_units("q", [_unit(CODE)], 0)


def test_the_service_focuses_the_retrieved_chunks_when_asked(make_service, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "adapters.py").write_text(CODE + "\n" + "\n".join(f"filler_{i} = {i}" for i in range(60)))
    service = make_service(top_k=1)
    service.ingest_paths("code", [str(folder)])
    question = "What is max_retries in HTTPAdapter.__init__?"
    whole = service.ask(question, "code").sources[0]
    focused = service.ask(question, "code", options=service.options(context_focus=2)).sources[0]
    kept = [line for line in focused["text"].splitlines() if line != GAP]
    assert (focused["path"], focused["start_line"]) == (whole["path"], whole["start_line"])
    assert 1 <= len(kept) <= 2 and set(kept) <= set(whole["text"].splitlines())
    assert "    def __init__(self, pool_connections=10, max_retries=DEFAULT_RETRIES):" in kept
    with pytest.raises(AppError, match="whole number of lines"):
        service.ask(question, "code", options=service.options(context_focus=-1))
