"""Ingestion progress as the terminal shows it: files, chunks and the time left; plain lines off a terminal."""

from __future__ import annotations

import io

from app.commands import progress as progress_module
from app.commands.progress import IngestProgressBar
from retrieval.records import IngestProgress


def test_plain_lines_off_a_terminal_say_files_chunks_and_time_left(monkeypatch):
    clock = iter([0.0, 30.0, 31.0, 200.0, 200.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    bar = IngestProgressBar(out, terminal=False)
    bar(IngestProgress(files_done=10, files_total=40, chunks_embedded=120, path="a.py"))
    bar(IngestProgress(files_done=11, files_total=40, chunks_embedded=130, path="b.py"))  # within 5 s: quiet
    bar(IngestProgress(files_done=40, files_total=40, chunks_embedded=480, path="z.py"))
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "tpa-rag: indexed 10/40 files, 120 chunks embedded, about 90 s left"
    assert lines[1] == "tpa-rag: indexed 40/40 files, 480 chunks embedded"
    assert len(lines) == 3 and lines[2] == lines[1]  # close() repeats the final count


def test_the_terminal_bar_counts_files_and_shows_chunks():
    out = io.StringIO()
    bar = IngestProgressBar(out, terminal=True)
    bar(IngestProgress(files_done=1, files_total=4, chunks_embedded=7, path="a.py"))
    bar(IngestProgress(files_done=4, files_total=4, chunks_embedded=30, path="d.py"))
    bar.close()
    text = out.getvalue()
    assert "4/4" in text and "30 chunks embedded" in text
