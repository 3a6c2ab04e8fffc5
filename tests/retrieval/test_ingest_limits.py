"""Limits of one ingestion (documents, chunks) and names that are not UTF-8, through the Corpus with the real
MiniLM model: a refusal is named in the summary, the rest completes, and nothing stored is lost to a limit."""

from __future__ import annotations

import json
import os
import sys

import pytest
from retrieval_helpers import write

from retrieval import IngestLimits


def skipped(report) -> dict[str, str]:
    return {s.path: s.reason for s in report.skipped}


def test_chunk_limit_of_one_ingestion(make_corpus, embedder, tmp_path):
    root = tmp_path / "notes"
    for i in range(4):
        write(root / f"n{i}.md", f"Note {i} is about the migration of swallows in the autumn.\n")
    corpus = make_corpus(limits=IngestLimits(max_chunks=2))
    report = corpus.ingest("c", [root])
    assert [d.path for d in report.documents] == ["notes/n0.md", "notes/n1.md"]
    assert len(embedder.texts) == 2
    reasons = skipped(report)
    assert "chunk limit of one ingestion reached (2 chunks)" in reasons["notes/n2.md"]
    assert "chunk limit" in reasons["notes/n3.md"]
    # A second run embeds the rest; what the first one stored stays.
    report = corpus.ingest("c", [root])
    assert {d.path: d.status for d in report.documents} == {
        "notes/n0.md": "unchanged", "notes/n1.md": "unchanged", "notes/n2.md": "added", "notes/n3.md": "added"}


def test_documents_cut_by_a_limit_are_not_removed(make_corpus, tmp_path):
    root = tmp_path / "notes"
    for i in range(4):
        write(root / f"n{i}.md", f"Note {i} is about lighthouses.\n")
    make_corpus().ingest("c", [root])
    for i in range(4):
        write(root / f"n{i}.md", f"Note {i} is now about harbours and tides.\n")
    report = make_corpus(limits=IngestLimits(max_chunks=1, max_files=3)).ingest("c", [root])
    assert report.removed == []
    reasons = skipped(report)
    assert "file limit reached" in reasons["notes/n3.md"]
    assert "chunk limit" in reasons["notes/n1.md"]
    assert any("not removed" in w.reason for w in report.warnings)
    assert len(make_corpus().list_collections()) == 1 and make_corpus().list_collections()[0].documents == 4


def test_document_limit_across_the_paths_of_one_ingestion(make_corpus, tmp_path):
    for folder in ("a", "b"):
        for i in range(2):
            write(tmp_path / folder / f"{folder}{i}.md", f"Document {folder}{i} about rivers.\n")
    report = make_corpus(limits=IngestLimits(max_files=3)).ingest("c", [tmp_path / "a", tmp_path / "b"])
    assert len(report.documents) == 3
    assert "file limit reached (3 files)" in skipped(report)["b/b1.md"]


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses names that are not UTF-8")
def test_name_that_is_not_utf8_does_not_stop_the_ingestion(corpus, tmp_path):
    root = tmp_path / "menu"
    write(root / "soup.md", "The soup of the day is tomato.\n")
    with open(os.path.join(os.fsencode(root), b"caf\xe9.txt"), "wb") as f:
        f.write(b"Coffee is served until noon.\n")
    report = corpus.ingest("c", [root])
    assert [d.path for d in report.documents] == ["menu/soup.md"]
    assert "not valid UTF-8" in skipped(report)["menu/caf\\xe9.txt"]
    json.dumps(report.to_json(), ensure_ascii=False).encode("utf-8")
    assert corpus.search("c", "soup of the day", k=1)[0][0].path == "menu/soup.md"


def test_one_file_over_the_chunk_limit_is_named(make_corpus, tmp_path):
    root = tmp_path / "book"
    write(root / "long.md", "".join(f"Paragraph {i} tells how the river floods the valley in spring.\n\n"
                                    for i in range(200)))
    write(root / "short.md", "A short note about maps.\n")
    report = make_corpus(limits=IngestLimits(max_chunks=3)).ingest("c", [root])
    assert [d.path for d in report.documents] == ["book/short.md"]
    assert "over the chunk limit of one ingestion (3 chunks)" in skipped(report)["book/long.md"]


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_chunks"):
        IngestLimits(max_chunks=0)
