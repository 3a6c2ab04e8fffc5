"""File bytes -> document text, by file type; what cannot become text raises `Unextractable` with the reason.

Text is returned with `\\n` line ends. Types:
- text and source code: UTF-8 (a BOM is honoured, UTF-16 with a BOM too); bytes that are not valid UTF-8 are
  replaced with U+FFFD and a warning is returned, but only once the content looks like text (binary sniffing
  first: a NUL byte or many control bytes in the first 8 KiB means binary and the file is skipped).
- html: the visible text (`retrieval.html_text`, linear time): tags, comments, scripts and styles are blanked
  out and entities decoded, keeping every line break, so the line numbers of the text are those of the file.
- pdf (pypdf): the text of each page, pages separated by a blank line and a form feed; encrypted PDFs that need
  a password and PDFs without a text layer are skipped.
- ipynb: the cells' sources (outputs dropped), each under a `# %% [markdown]` / `# %% [code]` marker line.
"""

from __future__ import annotations

import codecs
import io
import json
import logging
from dataclasses import dataclass, field

from retrieval.html_text import html_to_text

log = logging.getLogger(__name__)

TEXT_EXTENSIONS = frozenset({
    # prose and markup
    "txt", "text", "md", "markdown", "mdx", "rst", "tex", "org", "adoc", "asciidoc", "csv", "tsv",
    "html", "htm", "xhtml",
    # data and configuration
    "json", "yaml", "yml", "toml", "ini", "cfg", "conf", "xml", "properties", "env.example",
    # source code
    "py", "pyi", "pyw", "pyx", "pxd", "c", "h", "cc", "cpp", "cxx", "hpp", "hh", "hxx", "cu", "cuh", "java",
    "kt", "kts", "scala", "go", "rs", "js", "jsx", "mjs", "cjs", "ts", "tsx", "vue", "svelte", "rb", "php", "pl",
    "pm", "lua", "r", "jl", "swift", "m", "mm", "cs", "fs", "fsx", "hs", "ml", "mli", "ex", "exs", "erl", "hrl",
    "clj", "cljs", "dart", "zig", "nim", "v", "sv", "vhd", "vhdl", "sh", "bash", "zsh", "fish", "ps1", "bat",
    "cmd", "sql", "graphql", "gql", "proto", "thrift", "cmake", "mk", "gradle", "tf", "hcl", "nix", "el", "lisp",
    "scm", "css", "scss", "sass", "less", "jinja", "j2", "tmpl", "ipynb", "pdf",
})
TEXT_FILENAMES = frozenset({
    "makefile", "gnumakefile", "dockerfile", "containerfile", "readme", "license", "licence", "copying",
    "notice", "authors", "contributors", "changelog", "changes", "news", "history", "todo", "install",
    "rakefile", "gemfile", "procfile", "vagrantfile", "jenkinsfile", "justfile", "cmakelists.txt",
})
SNIFF_BYTES = 8192


class Unextractable(Exception):
    """A file that yields no text; the message is the reason shown to the user."""


@dataclass
class Extracted:
    text: str
    warnings: list[str] = field(default_factory=list)


def extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1].lower()
    return base.rsplit(".", 1)[-1] if "." in base.lstrip(".") else ""


def supported(name: str) -> bool:
    """Whether a file name has a type we ingest."""
    base = name.rsplit("/", 1)[-1].lower()
    return base in TEXT_FILENAMES or extension(base) in TEXT_EXTENSIONS


def extract(name: str, data: bytes) -> Extracted:
    """The text of a file named `name` (its type comes from the name) with content `data`."""
    if not data:
        raise Unextractable("empty file")
    ext = extension(name)
    if ext == "pdf":
        result = _pdf(data)
    elif ext == "ipynb":
        result = _notebook(data)
    else:
        result = decode_text(data)
        if ext in ("html", "htm", "xhtml"):
            result.text = html_to_text(result.text)
    result.text = normalize_newlines(result.text)
    if not result.text.strip():
        raise Unextractable("no text (only white space)")
    return result


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def looks_binary(data: bytes) -> bool:
    """A NUL byte, or more than 10% control bytes other than tab/newline/CR/FF/ESC, in the first 8 KiB."""
    head = data[:SNIFF_BYTES]
    if b"\x00" in head:
        return True
    control = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13, 27))
    return control > 0.1 * max(len(head), 1)


def decode_text(data: bytes) -> Extracted:
    """Bytes of a text file -> text. Raises Unextractable for binary content."""
    for bom, codec in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                       (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            body = data[len(bom):]
            if codec != "utf-8":
                return _decode(body, codec)
            data = body
            break
    if looks_binary(data):
        raise Unextractable("binary file")
    return _decode(data, "utf-8")


def _decode(data: bytes, codec: str) -> Extracted:
    try:
        return Extracted(data.decode(codec))
    except UnicodeDecodeError as exc:
        text = data.decode(codec, errors="replace")
        bad = text.count("\ufffd")
        return Extracted(text, [f"invalid {codec.upper()} (first at byte {exc.start}); {bad} character(s) "
                                f"replaced with U+FFFD"])


def _pdf(data: bytes) -> Extracted:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError as exc:  # a declared dependency; a clear reason anyway
        raise Unextractable("PDF support needs the package 'pypdf'") from exc
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                if not reader.decrypt(""):
                    raise Unextractable("encrypted PDF (needs a password)")
            except (NotImplementedError, PdfReadError) as exc:
                raise Unextractable(f"encrypted PDF: {exc}") from exc
        pages = []
        warnings = []
        for number, page in enumerate(reader.pages, start=1):
            try:
                pages.append((page.extract_text() or "").strip())
            except Exception as exc:  # noqa: BLE001 - pypdf raises many types on damaged pages; keep the others
                warnings.append(f"page {number}: text not extracted ({type(exc).__name__}: {exc})")
                pages.append("")
    except Unextractable:
        raise
    except Exception as exc:  # a damaged PDF must not stop the ingestion of the other files
        raise Unextractable(f"unreadable PDF ({type(exc).__name__}: {exc})") from exc
    text = "\n\n\f".join(pages)
    if not text.strip():
        raise Unextractable("PDF without a text layer (scanned?)")
    return Extracted(text, warnings)


def _notebook(data: bytes) -> Extracted:
    decoded = decode_text(data)
    try:
        notebook = json.loads(decoded.text)
        cells = notebook["cells"]
        if not isinstance(cells, list):
            raise TypeError("cells is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise Unextractable(f"not a valid Jupyter notebook ({exc})") from exc
    parts = []
    for cell in cells:
        if not isinstance(cell, dict):
            continue
        source = cell.get("source", "")
        if isinstance(source, list):
            source = "".join(str(s) for s in source)
        if not str(source).strip():
            continue
        parts.append(f"# %% [{cell.get('cell_type', 'code')}]\n{str(source).rstrip()}\n")
    return Extracted("\n".join(parts), decoded.warnings)
