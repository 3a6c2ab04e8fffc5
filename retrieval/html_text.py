"""The visible text of an HTML page, in linear time, with every line where it was in the file.

A one-pass tokenizer after the HTML standard's rules for what ends a construct: a tag ends at a `>` outside a
quoted attribute value, a comment at `-->`, a declaration or processing instruction at `>`, and the raw text of
`script`/`style` (dropped) or `textarea`/`title` (kept) at its own end tag; a construct cut off by the end of the
file runs to the end, as in a browser. Each scan starts where the previous one ended, so no input is read twice.
The standard library's `html.parser` is not used: before the fix of CPython issue 135462 (June 2025) it rescans
unterminated tags and comments, minutes for 100 KiB of `<script `, and we support Python versions without it.

Markup is replaced by its line breaks, or by one space when it has none (a tag between two words still separates
them), and entities are decoded within a line (`&#10;` becomes a space), so text line N is file line N.
"""

from __future__ import annotations

import html
import re

_DROPPED_RAW = frozenset({"script", "style"})  # raw text, not shown
_KEPT_RAW = frozenset({"textarea", "title"})  # raw text shown as text (entities decoded)
_HIDDEN = "template"  # parsed markup whose content is not shown
_MARKUP = re.compile(r"<[A-Za-z!?/]")  # any other "<" is text, as in "a < b"
_TAG_NAME = re.compile(r"[A-Za-z][^\t\n\f\r />]*")
_TAG_STOP = re.compile(r"[>=]")
_SPACE = re.compile(r"[\t\n\f\r ]*")


def _tag_end(source: str, pos: int) -> int:
    """Index just past the `>` that ends the tag whose attributes start at `pos`; -1 when the file ends first.

    A quote opens a value only right after `=`; such a value runs to the same quote, `>` included."""
    n = len(source)
    while pos < n:
        stop = _TAG_STOP.search(source, pos)
        if stop is None:
            return -1
        if stop.group() == ">":
            return stop.end()
        pos = _SPACE.match(source, stop.end()).end()
        if pos < n and source[pos] in "\"'":
            close = source.find(source[pos], pos + 1)
            if close < 0:
                return -1
            pos = close + 1
    return -1


def _raw_text_end(source: str, pos: int, name: str) -> tuple[int, int]:
    """(start, end) of the end tag `</name ...>` that closes raw text starting at `pos`; (len, len) if none."""
    n = len(source)
    closing = re.compile(rf"</{name}[\t\n\f\r />]", re.IGNORECASE)
    found = closing.search(source, pos)
    if found is None:
        return n, n
    end = _tag_end(source, found.end() - 1)
    return found.start(), (n if end < 0 else end)


class _Text:
    """The output: text pieces, and markup replaced by its line breaks (or a space)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.pieces: list[str] = []

    def text(self, start: int, end: int) -> None:
        if start >= end:
            return
        piece = self.source[start:end]
        if "&" in piece:
            piece = "\n".join(html.unescape(line).replace("\n", " ").replace("\r", " ")
                               for line in piece.split("\n"))
        self.pieces.append(piece)

    def markup(self, start: int, end: int) -> None:
        breaks = self.source.count("\n", start, end)
        self.pieces.append("\n" * breaks if breaks else " ")

    def result(self) -> str:
        return "\n".join(line.rstrip() for line in "".join(self.pieces).split("\n"))


def html_to_text(source: str) -> str:
    """Visible text of an HTML page with its line numbers kept: markup becomes spaces, newlines stay."""
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    out = _Text(source)
    n = len(source)
    hidden_depth = 0  # open <template> elements
    pos = 0

    def show(start: int, end: int) -> None:
        if hidden_depth:
            out.markup(start, end)
        else:
            out.text(start, end)

    while pos < n:
        found = _MARKUP.search(source, pos)
        if found is None:
            show(pos, n)
            break
        lt = found.start()
        show(pos, lt)
        nxt = source[lt + 1:lt + 2]
        if source.startswith("<!--", lt):
            close = source.find("-->", lt + 4)
            if source.startswith("<!-->", lt) or source.startswith("<!--->", lt):  # empty comments
                close = source.find(">", lt + 4) - 2
            end = n if close < 0 else close + 3
            out.markup(lt, end)
            pos = end
        elif nxt in ("!", "?") or (nxt == "/" and not _TAG_NAME.match(source, lt + 2)):
            if nxt == "/" and lt + 2 >= n:  # "</" at the very end is text
                show(lt, n)
                break
            close = source.find(">", lt + 2)  # declarations, processing instructions, bogus comments
            end = n if close < 0 else close + 1
            out.markup(lt, end)
            pos = end
        else:
            closing = nxt == "/"
            name_match = _TAG_NAME.match(source, lt + 2 if closing else lt + 1)
            name = name_match.group().lower()
            end = _tag_end(source, name_match.end())
            if end < 0:  # a tag cut off by the end of the file is dropped with the rest
                out.markup(lt, n)
                break
            out.markup(lt, end)
            pos = end
            if name == _HIDDEN:
                hidden_depth = max(0, hidden_depth + (-1 if closing else 1))
            elif not closing and (name in _DROPPED_RAW or name in _KEPT_RAW):
                text_end, tag_end = _raw_text_end(source, pos, name)
                if name in _KEPT_RAW:
                    show(pos, text_end)
                else:
                    out.markup(pos, text_end)
                if text_end < tag_end:
                    out.markup(text_end, tag_end)
                pos = tag_end
    return out.result()
