"""The grounding check: an answer's key terms against its cited sources, and what the user is shown."""

from __future__ import annotations

from app.grounding import grounding_note, key_terms, ungrounded_terms
from app.ui_render import metrics_line

SOURCE = {"path": "textwrap.py", "text": "def wrap(text, width=70, **kwargs):\n    w = TextWrapper(width=width)\n"}


def test_key_terms_are_identifiers_numbers_and_quoted_strings_not_the_questions_words():
    answer = "Call `textwrap.wrap` [1]: the default width is 70, see TextWrapper and max_lines or 'drop'."
    assert key_terms(answer, "What does textwrap.wrap do?") == ["drop", "TextWrapper", "max_lines", "70"]
    assert key_terms("It wraps text at a width.") == []


def test_an_answer_with_its_key_terms_in_the_sources_is_grounded():
    assert ungrounded_terms("The default width is 70 (see `TextWrapper`) [1].", [SOURCE]) == []


def test_an_answer_with_key_terms_in_no_source_is_flagged():
    assert ungrounded_terms("The default width is 80, set by DEFAULT_WIDTH.", [SOURCE]) == ["DEFAULT_WIDTH", "80"]
    assert ungrounded_terms("The width is 7.", [SOURCE]) == ["7"]  # 7 is not found inside 70
    assert ungrounded_terms("The width is 70.", []) == ["70"]  # no sources: nothing is grounded


def test_the_cited_path_grounds_a_file_name_but_not_another_file():
    assert ungrounded_terms("It is in textwrap.py [1].", [SOURCE]) == []
    assert ungrounded_terms("It is in wrapper.py [1].", [SOURCE]) == ["wrapper.py"]


def test_the_note_and_the_metrics_line():
    assert grounding_note([]) == ""
    assert grounding_note(["80"]) == "not found in the cited sources: 80"
    assert grounding_note([str(i) for i in range(7)], limit=5).endswith("0, 1, 2, 3, 4 and 2 more")
    metrics = {"prompt_tokens": 10, "reused_tokens": 0, "ttft_ms": 5.0, "decode_tokens_per_s": 1.0, "total_ms": 9}
    assert "not found" not in metrics_line(metrics)
    assert metrics_line({**metrics, "ungrounded_terms": ["80"]}).endswith("· not found in the cited sources: 80")


def test_the_service_reports_ungrounded_terms(service):
    result = service.ask("What is the capital of France?", "docs")
    expected = ungrounded_terms(result.answer, result.sources, "What is the capital of France?")
    assert result.metrics["ungrounded_terms"] == expected
    assert result.to_json()["ungrounded_terms"] == expected
