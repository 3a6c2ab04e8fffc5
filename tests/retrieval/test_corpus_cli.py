"""`tpa-rag ingest|search|collections`: the --json shapes, the text output and the exit codes."""

from __future__ import annotations

import json
import zipfile

import pytest

from app.cli import main


@pytest.fixture
def cli(data_dir, capsys, minilm):  # minilm: the model is loaded once per session, the CLI reuses it
    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--data-dir", str(data_dir), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def docs(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "owls.md").write_text("# Owls\n\nOwls hunt small mammals at night and see well in the dark.\n")
    (root / "syrup.txt").write_text("Maple syrup is made by boiling the sap of maple trees.\n")
    (root / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    return root


def test_ingest_json_shape(cli, docs, tmp_path):
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("kites.md", "Kites fly when the wind is steady.\n")
        zf.writestr("../evil.md", "no\n")
    code, out, _ = cli("ingest", "--collection", "notes", "--json", str(docs), str(archive))
    assert code == 0
    report = json.loads(out)
    assert list(report) == ["collection", "documents", "skipped", "chunks_total", "seconds"]
    assert report["collection"] == "notes"
    assert report["documents"] == [{"path": "docs/owls.md", "chunks": 1}, {"path": "docs/syrup.txt", "chunks": 1},
                                   {"path": "more.zip/kites.md", "chunks": 1}]
    assert {(s["path"], s["reason"]) for s in report["skipped"]} == {
        ("docs/photo.jpg", "unsupported file type '.jpg'"),
        ("more.zip/../evil.md", "unsafe path in archive (absolute or '..': path traversal)")}
    assert all(list(s) == ["path", "reason"] for s in report["skipped"])
    assert report["chunks_total"] == 3
    assert isinstance(report["seconds"], float) and report["seconds"] >= 0


def test_search_json_shape_and_several_queries(cli, docs):
    assert cli("ingest", "--collection", "notes", "--json", str(docs))[0] == 0
    for extra in ([], ["--hybrid"]):
        code, out, _ = cli("search", "--collection", "notes", "-k", "2", "--json", *extra,
                           "what do owls eat", "how is maple syrup made")
        assert code == 0
        results = json.loads(out)
        assert isinstance(results, list) and len(results) == 2
        assert all(len(hits) == 2 for hits in results)
        for hits in results:
            for hit in hits:
                assert list(hit) == ["path", "score", "start_line", "end_line", "text"]
                assert isinstance(hit["score"], float) and isinstance(hit["start_line"], int)
        assert results[0][0]["path"] == "docs/owls.md" and results[1][0]["path"] == "docs/syrup.txt"
        assert results[0][0]["start_line"] == 1 and results[0][0]["end_line"] == 3


def test_collections_list_and_delete(cli, docs):
    code, out, _ = cli("collections", "list", "--json")
    assert code == 0 and json.loads(out) == []
    cli("ingest", "--collection", "notes", str(docs))
    code, out, _ = cli("collections", "list", "--json")
    (entry,) = json.loads(out)
    assert list(entry) == ["name", "documents", "chunks", "embedding_model", "created_at"]
    assert (entry["name"], entry["documents"], entry["chunks"]) == ("notes", 2, 2)
    code, out, _ = cli("collections", "list")
    assert code == 0 and out.startswith("notes\t2 documents\t2 chunks")
    code, out, _ = cli("collections", "delete", "notes", "--json")
    assert code == 0 and json.loads(out) == {"deleted": "notes"}
    assert json.loads(cli("collections", "list", "--json")[1]) == []


def test_text_output(cli, docs):
    code, out, _ = cli("ingest", "--collection", "notes", str(docs))
    assert code == 0
    assert out.splitlines()[0].startswith("notes: 2 documents (2 added), 2 chunks (2 embedded now)")
    assert "  skipped  docs/photo.jpg: unsupported file type '.jpg'" in out
    code, out, _ = cli("ingest", "--collection", "notes", str(docs))
    assert "2 documents (2 unchanged), 2 chunks (0 embedded now)" in out
    code, out, _ = cli("search", "--collection", "notes", "-k", "1", "night hunters")
    assert code == 0
    assert out.splitlines()[:2] == ["? night hunters", out.splitlines()[1]]
    assert out.splitlines()[1].startswith("  1. docs/owls.md:1-3  score ")


def test_user_errors_exit_2_without_traceback(cli, docs, tmp_path):
    code, _, err = cli("search", "--collection", "nothing", "question")
    assert code == 2 and "no collection named 'nothing'" in err and "Traceback" not in err
    code, _, err = cli("ingest", "--collection", "notes", str(tmp_path / "missing"))
    assert code == 2 and "no such file or folder" in err
    code, _, err = cli("ingest", "--collection", "bad name!", str(docs))
    assert code == 2 and "invalid collection name" in err
    code, _, err = cli("collections", "delete", "nothing")
    assert code == 2 and "no collection named" in err
