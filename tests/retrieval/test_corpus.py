"""The Corpus façade with the real MiniLM model on tiny corpora: ingestion, incremental updates, bad input,
search, index repair, deletion."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from retrieval_helpers import CountingEmbedder, write

from retrieval import IndexParams, IngestLimits
from retrieval.errors import (
    EmbeddingModelMismatchError,
    InvalidCollectionNameError,
    InvalidQueryError,
    SourceNotFoundError,
    UnknownCollectionError,
    UnknownDocumentError,
)
from retrieval.index import VectorIndex

COLORS = '''"""Colour conversions."""


def rgb_to_hsv(r, g, b):
    """Convert a red, green, blue colour to hue, saturation and value."""
    high, low = max(r, g, b), min(r, g, b)
    return high - low, low, high
'''
BREAD = """# Baking bread

Mix flour, water, salt and a sourdough starter. Let the dough rise overnight,
shape the loaf and bake it in a hot oven until the crust is dark brown.
"""
TRAINS = """Railway timetables list when each train leaves the station and when it arrives.
Delays are announced on the platform display.
"""


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "proj"
    write(root / "colors.py", COLORS)
    write(root / "bread.md", BREAD)
    write(root / "trains.txt", TRAINS)
    return root


def top_paths(corpus, question: str, hybrid: bool = False, k: int = 3) -> list[str]:
    return [h.path for h in corpus.search("c", [question], k=k, hybrid=hybrid)[0]]


def test_ingest_and_search_with_line_ranges(corpus, embedder, project):
    report = corpus.ingest("c", [project])
    assert sorted((d.path, d.status) for d in report.documents) == [
        ("proj/bread.md", "added"), ("proj/colors.py", "added"), ("proj/trains.txt", "added")]
    assert report.chunks_embedded == report.chunks_total == len(embedder.texts) == 3
    assert embedder.texts[0].split("\n", 1)[0].startswith("proj/")  # the path header
    data = report.to_json()
    assert list(data) == ["collection", "documents", "skipped", "chunks_total", "seconds"]
    assert all(list(d) == ["path", "chunks"] for d in data["documents"])

    for hybrid in (False, True):
        assert top_paths(corpus, "how long should sourdough dough rise before baking", hybrid)[0] == "proj/bread.md"
        assert top_paths(corpus, "convert an RGB colour to HSV", hybrid)[0] == "proj/colors.py"
    hit = corpus.search("c", "train departure times", k=1)[0][0]
    assert hit.path == "proj/trains.txt" and 0 < hit.score <= 1
    source_lines = (project / "trains.txt").read_text().split("\n")
    assert hit.text == "\n".join(source_lines[hit.start_line - 1:hit.end_line])
    assert (hit.start_line, hit.end_line) == (1, 2)
    assert hit.to_json().keys() == {"path", "score", "start_line", "end_line", "text"}
    assert len(corpus.search("c", ["one", "two", "three"], k=10)) == 3
    assert len(corpus.search("c", "anything", k=10)[0]) == 3  # fewer chunks than k


def test_incremental_reingestion(corpus, embedder, project):
    first = corpus.ingest("c", [project])
    assert first.chunks_embedded == 3
    embedder.reset()

    again = corpus.ingest("c", [project])
    assert embedder.calls == 0 and again.chunks_embedded == 0
    assert {d.status for d in again.documents} == {"unchanged"}
    assert again.chunks_total == first.chunks_total

    # A new mtime with the same content: hashed, not re-embedded; the new mtime is recorded.
    stamp = (project / "bread.md").stat().st_mtime_ns + 5_000_000_000
    os.utime(project / "bread.md", ns=(stamp, stamp))
    touched = corpus.ingest("c", [project])
    assert embedder.calls == 0 and {d.status for d in touched.documents} == {"unchanged"}
    known = corpus.db.known_documents(corpus.db.require_collection("c").id)
    assert known[(str(project), "bread.md")].mtime_ns == stamp

    # One changed file: only its chunks are embedded, and the old text is gone from search.
    write(project / "trains.txt", "Ferries cross the lake every hour; the ticket office sells day passes.\n")
    changed = corpus.ingest("c", [project])
    assert [t.split("\n", 1)[0] for t in embedder.texts] == ["proj/trains.txt"]
    assert {d.path: d.status for d in changed.documents}["proj/trains.txt"] == "updated"
    hit = corpus.search("c", "ferry across the lake", k=1)[0][0]
    assert hit.path == "proj/trains.txt" and "Ferries" in hit.text
    assert not any("Railway" in h.text for h in corpus.search("c", "railway timetable", k=3)[0])

    # A new file is embedded alone; a deleted file is removed from the collection.
    embedder.reset()
    write(project / "sub" / "tea.rst", "Green tea is brewed with water below boiling, for two minutes.\n")
    (project / "colors.py").unlink()
    last = corpus.ingest("c", [project])
    assert [t.split("\n", 1)[0] for t in embedder.texts] == ["proj/sub/tea.rst"]
    assert last.removed == ["proj/colors.py"]
    assert sorted(d.path for d in corpus.list_documents("c")) == ["proj/bread.md", "proj/sub/tea.rst",
                                                                  "proj/trains.txt"]
    assert "proj/colors.py" not in top_paths(corpus, "convert an RGB colour to HSV", k=3)
    assert corpus.list_collections()[0].chunks == 3


def test_bad_inputs_do_not_stop_the_rest(corpus, embedder, tmp_path, data_dir):
    root = tmp_path / "mixed"
    write(root / "good.md", "# Good\nThe good file explains how tides follow the moon.\n")
    write(root / "latin1.py", b"# caf\xe9 menu\nprice = 3\n")
    write(root / "binary.txt", b"abc\x00\x01\x02" * 100)
    write(root / "empty.md", "")
    write(root / "blank.txt", "   \n\n")
    write(root / "broken.pdf", b"%PDF-1.4 not really")
    write(root / "bad.ipynb", b"{not json")
    os.symlink(tmp_path / "elsewhere.txt", root / "link_out.txt")
    write(tmp_path / "elsewhere.txt", "outside\n")
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("inside/ok.txt", "Zip entries are read in memory and never extracted.\n")
        zf.writestr("../../escape.txt", "should never land anywhere\n")
        zf.writestr("zeros.txt", "\0" * (2 * 1024 * 1024))
    before = {p for p in tmp_path.rglob("*") if data_dir not in p.parents and p != data_dir}

    report = corpus.ingest("c", [root, archive], progress=None)
    assert sorted(d.path for d in report.documents) == ["mixed/good.md", "mixed/latin1.py", "upload.zip/inside/ok.txt"]
    skipped = {s.path: s.reason for s in report.skipped}
    assert "binary" in skipped["mixed/binary.txt"]
    assert skipped["mixed/empty.md"] == "empty file"
    assert "white space" in skipped["mixed/blank.txt"]
    assert "PDF" in skipped["mixed/broken.pdf"]
    assert "notebook" in skipped["mixed/bad.ipynb"]
    assert "leaves the root" in skipped["mixed/link_out.txt"]
    assert "path traversal" in skipped["upload.zip/../../escape.txt"]
    assert "zip bomb" in skipped["upload.zip/zeros.txt"]
    assert [(w.path, "invalid UTF-8" in w.reason) for w in report.warnings] == [("mixed/latin1.py", True)]
    assert "\ufffd" in corpus.document_texts("c", ["mixed/latin1.py"])[0].text
    after = {p for p in tmp_path.rglob("*") if data_dir not in p.parents and p != data_dir}
    assert after == before, "ingestion wrote outside the data directory"
    assert not any(p.name == "escape.txt" for p in data_dir.rglob("*"))


def test_size_limit(make_corpus, tmp_path):
    corpus = make_corpus(limits=IngestLimits(max_file_bytes=100))
    write(tmp_path / "d" / "small.txt", "small file\n")
    write(tmp_path / "d" / "large.txt", "large file " * 50)
    report = corpus.ingest("c", [tmp_path / "d"])
    assert [d.path for d in report.documents] == ["d/small.txt"]
    assert "file too large (550 bytes, limit 100)" == report.skipped[0].reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(corpus, tmp_path):
    write(tmp_path / "d" / "ok.txt", "fine\n")
    locked = write(tmp_path / "d" / "locked.txt", "secret\n")
    locked.chmod(0)
    report = corpus.ingest("c", [tmp_path / "d"])
    assert [d.path for d in report.documents] == ["d/ok.txt"]
    assert "unreadable" in report.skipped[0].reason


def test_request_errors(corpus, embedder, project):
    with pytest.raises(SourceNotFoundError):
        corpus.ingest("c", [project, project / "missing.txt"])
    assert corpus.list_collections() == [] and embedder.calls == 0
    with pytest.raises(InvalidCollectionNameError):
        corpus.ingest("../bad name", [project])
    with pytest.raises(UnknownCollectionError):
        corpus.search("nothing", "question")
    corpus.ingest("c", [project])
    with pytest.raises(InvalidQueryError):
        corpus.search("c", "   ")
    with pytest.raises(InvalidQueryError):
        corpus.search("c", "question", k=0)
    with pytest.raises(UnknownDocumentError):
        corpus.document_texts("c", ["proj/nope.md"])
    assert [d.path for d in corpus.ingest("c", str(project / "bread.md")).documents] == ["bread.md"]  # one path


def test_documents_and_texts(corpus, project):
    corpus.ingest("c", [project / "bread.md", project])
    docs = corpus.list_documents("c")
    assert [d.path for d in docs] == ["bread.md", "proj/bread.md", "proj/colors.py", "proj/trains.txt"]
    assert {d.kind for d in docs} == {"markdown", "python", "prose"}
    texts = corpus.document_texts("c", ["proj/colors.py", "bread.md"])
    assert [t.path for t in texts] == ["bread.md", "proj/colors.py"]  # canonical order, whatever was asked
    assert texts[1].text == COLORS
    assert len(corpus.document_texts("c")) == 4
    assert corpus.remove_documents("c", ["bread.md"]) == ["bread.md"]
    assert "bread.md" not in [h.path for h in corpus.search("c", "sourdough bread", k=4)[0]]


def test_delete_collection(corpus, project, data_dir):
    corpus.ingest("c", [project])
    corpus.ingest("keep", [project / "bread.md"])
    index_files = sorted(p.name for p in (data_dir / "indexes").glob("*.faiss"))
    assert len(index_files) == 2
    corpus.delete_collection("c")
    assert [c.name for c in corpus.list_collections()] == ["keep"]
    assert len(list((data_dir / "indexes").glob("*.faiss"))) == 1
    with pytest.raises(UnknownCollectionError):
        corpus.search("c", "bread")
    with pytest.raises(UnknownCollectionError):
        corpus.delete_collection("c")
    from sqlalchemy import text

    with corpus.db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM retrieval_documents")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM retrieval_chunks")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM retrieval_chunks_fts")).scalar() == 1
    corpus.create_collection("c")
    assert corpus.search("c", "bread", k=3) == [[]]
    assert corpus.search("keep", "bread", k=3, hybrid=True)[0][0].path == "bread.md"


def test_index_is_rebuilt_from_the_database_without_re_embedding(make_corpus, embedder, project, data_dir):
    make_corpus().ingest("c", [project])
    (index_file,) = (data_dir / "indexes").glob("*.faiss")
    for damage in ("delete", "corrupt"):
        if damage == "delete":
            index_file.unlink()
        else:
            index_file.write_bytes(b"garbage")
        embedder.reset()
        fresh = make_corpus()
        assert top_paths(fresh, "sourdough bread")[0] == "proj/bread.md"
        assert embedder.texts == ["sourdough bread"], "only the query may be embedded"
        assert len(VectorIndex.load(index_file)) == 3, "the repaired index is saved"


def test_a_second_instance_sees_new_chunks(make_corpus, project, tmp_path):
    reader, writer = make_corpus(), make_corpus()
    writer.ingest("c", [project / "bread.md"])
    assert top_paths(reader, "railway station") == ["bread.md"]
    writer.ingest("c", [project / "trains.txt"])
    assert top_paths(reader, "railway station")[0] == "trains.txt"


def test_hnsw_collection_never_returns_replaced_chunks(make_corpus, tmp_path):
    corpus = make_corpus(index_params=IndexParams(hnsw_threshold=4, compact_fraction=0.9))
    folder = tmp_path / "many"
    topics = ["volcanoes erupt lava", "penguins live in Antarctica", "violins have four strings",
              "glaciers carve valleys", "bees make honey from nectar", "chess openings control the centre"]
    for i, topic in enumerate(topics):
        write(folder / f"t{i}.txt", f"{topic}.\n")
    corpus.ingest("c", [folder])
    index = corpus._cached_index(corpus.db.require_collection("c"))
    assert index.kind == "hnsw"
    write(folder / "t1.txt", "Emperor penguins huddle together through the polar winter.\n")
    corpus.ingest("c", [folder])
    index = corpus._cached_index(corpus.db.require_collection("c"))
    assert index.kind == "hnsw" and index._deleted, "replaced chunks are tombstones in HNSW"
    hits = corpus.search("c", "penguins", k=6)[0]
    assert [h.text for h in hits if h.path == "many/t1.txt"] == [
        "Emperor penguins huddle together through the polar winter."]
    assert len(hits) == 6
    db_ids = set(corpus.db.chunk_ids(corpus.db.require_collection("c").id).tolist())
    assert set(index.ids().tolist()) == db_ids


def test_model_mismatch_is_refused(make_corpus, minilm, project):
    make_corpus().ingest("c", [project / "bread.md"])
    other = make_corpus(embedder=CountingEmbedder(minilm, name="another-model"))
    with pytest.raises(EmbeddingModelMismatchError):
        other.ingest("c", [project / "trains.txt"])
    with pytest.raises(EmbeddingModelMismatchError):
        other.search("c", "bread")


def test_zip_reingestion_is_incremental(corpus, embedder, tmp_path):
    archive = tmp_path / "notes.zip"

    def pack(entries: dict[str, str]) -> None:
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, text in entries.items():
                zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 5, 1, 12, 0, 0)), text)

    pack({"a.md": "Owls hunt at night.\n", "b.md": "Maple syrup comes from sap.\n", "c.md": "Kites fly in wind.\n"})
    corpus.ingest("c", [archive])
    embedder.reset()
    pack({"a.md": "Owls hunt at night.\n", "b.md": "Birch sap can be made into syrup too.\n"})
    report = corpus.ingest("c", [archive])
    assert [t.split("\n", 1)[0] for t in embedder.texts] == ["notes.zip/b.md"]
    assert report.removed == ["notes.zip/c.md"]
    assert {d.path: d.status for d in report.documents} == {"notes.zip/a.md": "unchanged",
                                                           "notes.zip/b.md": "updated"}


def test_progress_callback(corpus, project):
    events = []
    corpus.ingest("c", [project], progress=events.append)
    assert events[-1].files_done == events[-1].files_total == 3
    assert events[-1].chunks_embedded == 3
    assert [e.files_done for e in events] == sorted(e.files_done for e in events)


def test_save_upload_stays_in_the_uploads_folder(corpus, data_dir):
    path = corpus.save_upload("c", "../../etc/pass wd.txt", b"uploaded text\n")
    assert path == data_dir / "uploads" / "c" / "pass wd.txt"
    assert path.read_bytes() == b"uploaded text\n"
    weird = corpus.save_upload("c", "..\\..\\evil$name.md", b"x\n")
    assert weird.parent == data_dir / "uploads" / "c" and weird.name == "evil_name.md"
    assert corpus.ingest("c", [path]).documents[0].path == "pass wd.txt"


def test_search_embeds_all_queries_in_one_call(corpus, embedder, project):
    corpus.ingest("c", [project])
    embedder.reset()
    results = corpus.search("c", ["bread", "colour", "train"], k=1)
    assert embedder.calls == 1
    assert [r[0].path for r in results] == ["proj/bread.md", "proj/colors.py", "proj/trains.txt"]
    assert isinstance(results[0][0].chunk_id, int) and results[0][0].chunk_index == 0
    vectors = np.stack([embedder.inner.embed([t])[0] for t in ["bread"]])
    assert np.isclose(np.linalg.norm(vectors[0]), 1.0, atol=1e-5)
