"""Chunk boundaries, overlap, token budgets and line ranges."""

from __future__ import annotations

import textwrap

import pytest

from retrieval.chunking import Chunk, ChunkingConfig, chunk_text, count_tokens, kind_for_path


def check_chunks(text: str, chunks: list[Chunk], config: ChunkingConfig) -> None:
    """Every chunk is a span of the text, within budget, with the right lines; all non-blank text is covered."""
    lines = text.split("\n")
    covered = [False] * len(text)
    for c in chunks:
        assert text[c.start_char:c.end_char] == c.text
        assert c.text == c.text.strip() and c.text
        assert c.n_tokens == count_tokens(c.text) <= config.max_tokens
        assert c.start_line == text.count("\n", 0, c.start_char) + 1
        assert c.end_line == text.count("\n", 0, c.end_char - 1) + 1
        span_lines = c.text.split("\n")
        assert span_lines[0] in lines[c.start_line - 1]
        assert span_lines[-1] in lines[c.end_line - 1]
        assert len(span_lines) == c.end_line - c.start_line + 1
        for k in range(c.start_char, c.end_char):
            covered[k] = True
    assert all(covered[k] or text[k].isspace() for k in range(len(text)))
    starts = [c.start_char for c in chunks]
    assert starts == sorted(starts)


def paragraph(i: int, sentences: int = 3) -> str:
    return " ".join(f"Paragraph {i} sentence {j} talks about topic {i * 10 + j} in plain words." for j in
                    range(sentences))


def test_prose_splits_at_paragraphs_and_overlaps():
    config = ChunkingConfig(max_tokens=80, overlap_tokens=30)
    text = "\n\n".join(paragraph(i, 2) for i in range(12)) + "\n"
    chunks = chunk_text(text, "prose", config)
    check_chunks(text, chunks, config)
    assert len(chunks) > 3
    for c in chunks:  # boundaries are paragraph boundaries
        assert c.text.startswith("Paragraph ") and c.text.endswith(".")
        assert text[c.end_char:c.end_char + 2] in ("\n\n", "\n")
    # consecutive chunks share whole paragraphs, and never more than the overlap budget
    for a, b in zip(chunks, chunks[1:]):
        assert b.start_char < a.end_char, "expected overlap"
        assert count_tokens(text[b.start_char:a.end_char]) <= config.overlap_tokens
        assert b.end_char > a.end_char


def test_long_paragraph_is_cut_at_sentences_and_huge_words_at_tokens():
    config = ChunkingConfig(max_tokens=40, overlap_tokens=0)
    long_paragraph = paragraph(1, 12)
    word = "x" * 3000 + "y" * 3000
    text = f"Intro line.\n\n{long_paragraph}\n\n{word}\n"
    chunks = chunk_text(text, "prose", config)
    check_chunks(text, chunks, config)
    sentence_chunks = [c for c in chunks if c.text.startswith("Paragraph 1")]
    assert len(sentence_chunks) >= 3
    assert all(c.text.endswith(".") for c in sentence_chunks)
    assert "".join(c.text for c in chunks if set(c.text) <= {"x", "y"}) == word


def test_python_splits_at_top_level_definitions():
    config = ChunkingConfig(max_tokens=60, overlap_tokens=10)
    source = textwrap.dedent('''\
        """Module docstring."""
        import os
        import sys

        CONSTANT = 3


        # A comment that belongs to first.
        @decorator(with_args=True)
        def first(a, b):
            """Add two numbers and a constant together."""
            total = a + b + CONSTANT
            return total


        def second(values):
            """Sum of the squares of values, computed in a loop for clarity."""
            result = 0
            for v in values:
                result += v * v
            return result


        class Big:
            """A class too large for one chunk."""

            attribute = 1

            def method_one(self):
                """The first method returns a long string describing what it does."""
                return "one one one one one one one one one one one one one one one one"

            def method_two(self):
                """The second method returns a long string describing what it does."""
                return "two two two two two two two two two two two two two two two two"

            def method_three(self):
                """The third method returns a long string describing what it does."""
                return "three three three three three three three three three three three"
        ''')
    chunks = chunk_text(source, "python", config)
    check_chunks(source, chunks, config)
    lines = source.split("\n")
    starts = {c.start_line for c in chunks}
    def_line = lines.index("def second(values):") + 1
    assert def_line in starts
    comment_line = lines.index("# A comment that belongs to first.") + 1
    assert comment_line in starts, "a definition's comment block and decorators start its chunk"
    boundaries = {1, comment_line, def_line, lines.index("class Big:") + 1}
    boundaries |= {i for i, text in enumerate(lines, 1) if text.startswith("    def method_")}
    assert starts <= boundaries, f"chunks start at {sorted(starts)}, boundaries are {sorted(boundaries)}"
    class_chunks = [c for c in chunks if c.start_line >= lines.index("class Big:") + 1]
    assert len(class_chunks) >= 2, "the class is over budget and must be split between its members"
    # no chunk starts or ends in the middle of a function body
    for c in chunks:
        first = lines[c.start_line - 1]
        assert not first.startswith(" " * 8), f"chunk starts inside a body: {first!r}"


def test_python_small_definitions_are_packed_together():
    config = ChunkingConfig(max_tokens=200, overlap_tokens=0)
    source = "\n\n".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(6))
    chunks = chunk_text(source, "python", config)
    check_chunks(source, chunks, config)
    assert len(chunks) == 1 and chunks[0].start_line == 1


def test_python_syntax_error_falls_back_to_blocks():
    config = ChunkingConfig(max_tokens=40, overlap_tokens=0)
    source = "def broken(:\n    pass\n\n" + "\n\n".join(f"def ok{i}(a, b, c):\n    return a + b + c + {i}" for i in
                                                       range(8)) + "\n"
    chunks = chunk_text(source, "python", config)
    check_chunks(source, chunks, config)
    assert len(chunks) > 1


def test_c_like_code_splits_at_unindented_blocks():
    config = ChunkingConfig(max_tokens=60, overlap_tokens=0)
    functions = [f"static int func_{i}(int a, int b)\n{{\n    int c = a * {i};\n    if (c > b) {{\n"
                 f"        return c - b;\n    }}\n\n    return b - c + {i};\n}}\n" for i in range(6)]
    source = "#include <stdio.h>\n\n" + "\n".join(functions)
    chunks = chunk_text(source, "code", config)
    check_chunks(source, chunks, config)
    lines = source.split("\n")
    for c in chunks:
        first = lines[c.start_line - 1]
        assert first.startswith(("static int func_", "#include")), first
        assert lines[c.end_line - 1] == "}" or c.end_line == 1


def test_markdown_headings_start_chunks():
    config = ChunkingConfig(max_tokens=120, overlap_tokens=20)
    text = "\n\n".join(f"## Section {i}\n\n{paragraph(i, 2)}" for i in range(6)) + "\n"
    chunks = chunk_text(text, "markdown", config)
    check_chunks(text, chunks, config)
    assert all(c.text.startswith("## Section") for c in chunks)


def test_special_tokens_and_unicode_are_plain_text():
    config = ChunkingConfig(max_tokens=32, overlap_tokens=4)
    text = "Text with <|endoftext|> inside.\n\n" + "日本語の文章です。" * 30 + "\n\nemoji 😀😀😀 end."
    chunks = chunk_text(text, "prose", config)
    check_chunks(text, chunks, config)


@pytest.mark.parametrize("name,kind", [("a/b.py", "python"), ("README.md", "markdown"), ("x.rst", "prose"),
                                       ("main.rs", "code"), ("Makefile", "prose"), ("page.html", "prose")])
def test_kind_for_path(name, kind):
    assert kind_for_path(name) == kind


def test_config_is_validated():
    with pytest.raises(ValueError):
        ChunkingConfig(max_tokens=8)
    with pytest.raises(ValueError):
        ChunkingConfig(max_tokens=100, overlap_tokens=60)
