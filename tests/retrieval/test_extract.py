"""Text extraction: encodings, binary sniffing, HTML, notebooks, PDFs."""

from __future__ import annotations

import io
import json

import pytest

from retrieval.extract import Unextractable, extract, html_to_text, supported


def make_pdf(lines: list[str]) -> bytes:
    """A minimal one-page PDF with a text layer (Helvetica), offsets computed for a valid xref table."""
    stream = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) '" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n{body}\nendobj\n".encode())
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def test_utf8_text_and_crlf():
    assert extract("a.txt", "héllo\r\nwörld\rend".encode()).text == "héllo\nwörld\nend"


def test_invalid_utf8_is_replaced_with_a_warning():
    result = extract("a.py", b"x = 1\n# caf\xe9 \xff\n")
    assert result.text == "x = 1\n# caf\ufffd \ufffd\n"
    assert len(result.warnings) == 1 and "invalid UTF-8" in result.warnings[0]


def test_utf8_bom_and_utf16_bom():
    assert extract("a.md", b"\xef\xbb\xbf# Title\n").text == "# Title\n"
    assert extract("a.txt", "\ufeffdouble byte text\n".encode("utf-16-le")).text == "double byte text\n"


@pytest.mark.parametrize("data", [b"\x00\x01\x02binary\x00data", bytes(range(0, 32)) * 20])
def test_binary_content_is_refused(data):
    with pytest.raises(Unextractable, match="binary"):
        extract("looks_like.txt", data)


@pytest.mark.parametrize("data,reason", [(b"", "empty"), (b"  \n\t\n", "white space")])
def test_empty_and_blank(data, reason):
    with pytest.raises(Unextractable, match=reason):
        extract("a.txt", data)


def test_html_keeps_line_numbers_and_drops_markup():
    page = ("<html>\n<head><style>\nbody {color: red}\n</style></head>\n<body>\n<p>First &amp; "
            "<b>bold</b></p>\n<script>var x = 1;\n</script>\n<p>Last line</p>\n</body></html>\n")
    text = html_to_text(page)
    lines = text.split("\n")
    assert len(lines) == len(page.split("\n"))
    assert lines[5].split() == ["First", "&", "bold"]
    assert lines[8].strip() == "Last line"
    assert "color" not in text and "var x" not in text
    assert extract("page.html", page.encode()).text == text


def test_html_tags_spanning_lines_comments_and_unterminated_markup():
    page = ('<p title="a\nb">One</p>\n<!-- a comment\nover two lines --> Two\n<a\n  href="x">Three</a>\n'
            '<script>if (a < b) { x = "</p>"; }\n</script>Four &lt;5&gt; &copy;\n<textarea>Five <b></textarea>\n'
            '<p>Six<!-- never closed\nSeven')
    lines = html_to_text(page).split("\n")
    assert len(lines) == page.count("\n") + 1
    assert lines[1] == "One"
    assert lines[3].strip() == "Two"
    assert lines[5].strip() == "Three"
    assert lines[7].strip() == "Four <5> \u00a9"
    assert lines[8].strip() == "Five <b>"
    assert lines[9].strip() == "Six" and lines[10] == ""


@pytest.mark.parametrize("unit", ["<script ", "<!--", "</", "<a b='", "<!", "<textarea>&", "<"])
def test_html_extraction_is_linear_on_unterminated_markup(unit):
    import time

    def seconds(kib: int) -> float:
        page = unit * (kib * 1024 // len(unit))
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            html_to_text(page)
            best = min(best, time.perf_counter() - start)
        return best

    small, large = seconds(25), seconds(100)
    assert large < 0.5, f"100 KiB of {unit!r}: {large:.3f} s"
    assert large < 12 * small + 0.02, f"25 KiB {small:.4f} s, 100 KiB {large:.4f} s: not linear"


def test_notebook_cells_without_outputs():
    nb = {"cells": [
        {"cell_type": "markdown", "source": ["# Title\n", "Some words."]},
        {"cell_type": "code", "source": "print('hi')", "outputs": [{"text": "SECRET OUTPUT"}]},
        {"cell_type": "code", "source": []},
    ], "metadata": {}, "nbformat": 4}
    text = extract("n.ipynb", json.dumps(nb).encode()).text
    assert "# %% [markdown]\n# Title\nSome words." in text
    assert "# %% [code]\nprint('hi')" in text
    assert "SECRET" not in text


def test_broken_notebook():
    with pytest.raises(Unextractable, match="notebook"):
        extract("n.ipynb", b'{"cells": 3}')


def test_pdf_text_layer():
    text = extract("doc.pdf", make_pdf(["Tensor product attention", "factorizes the cache"])).text
    assert "Tensor product attention" in text and "factorizes the cache" in text


def test_pdf_without_text_encrypted_and_damaged():
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(width=100, height=100)
    blank = io.BytesIO()
    writer.write(blank)
    with pytest.raises(Unextractable, match="text layer"):
        extract("scan.pdf", blank.getvalue())
    writer.encrypt(user_password="secret", owner_password="owner")
    locked = io.BytesIO()
    writer.write(locked)
    with pytest.raises(Unextractable, match="encrypted"):
        extract("locked.pdf", locked.getvalue())
    with pytest.raises(Unextractable, match="PDF"):
        extract("broken.pdf", b"%PDF-1.4\nthis is not a pdf at all")


@pytest.mark.parametrize("name,ok", [("a.py", True), ("Makefile", True), ("x/README", True), ("a.PDF", True),
                                     ("img.png", False), ("a.exe", False), ("noext", False), (".bashrc", False)])
def test_supported(name, ok):
    assert supported(name) is ok
