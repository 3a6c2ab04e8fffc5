"""The index and the tables outlive the process: another process ingests, this one searches, and back."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from retrieval.index import VectorIndex

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import json, sys
    from app.database import make_engine
    from retrieval import Corpus

    data_dir, action, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    corpus = Corpus(make_engine(f"sqlite:///{data_dir}/tpa_rag.sqlite"), f"{data_dir}/indexes", f"{data_dir}/uploads")
    if action == "ingest":
        report = corpus.ingest("shared", [arg])
        print(json.dumps(report.to_json()))
    else:
        hits = corpus.search("shared", [arg], k=2)[0]
        print(json.dumps([h.to_json() for h in hits]))
""")


def child(data_dir: Path, action: str, arg: str) -> object:
    done = subprocess.run([sys.executable, "-c", CHILD, str(data_dir), action, arg], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh processes load the model (~10 s each on 2 cores)
def test_index_persists_across_processes(make_corpus, embedder, data_dir, tmp_path):
    folder = tmp_path / "kb"
    folder.mkdir()
    (folder / "glass.md").write_text("Glass is made by melting sand, soda and lime in a furnace.\n")
    (folder / "bees.md").write_text("Honey bees dance to tell the hive where flowers are.\n")

    report = child(data_dir, "ingest", str(folder))
    assert report["chunks_total"] == 2
    (index_file,) = (data_dir / "indexes").glob("*.faiss")
    assert len(VectorIndex.load(index_file)) == 2

    corpus = make_corpus()
    hits = corpus.search("shared", "how do bees communicate", k=2)[0]
    assert hits[0].path == "kb/bees.md"
    assert embedder.texts == ["how do bees communicate"], "the other process's vectors are used as they are"

    # This process changes the collection; a new process sees the change.
    (folder / "glass.md").write_text("Volcanic obsidian is a natural glass formed when lava cools quickly.\n")
    assert corpus.ingest("shared", [folder]).chunks_embedded == 1
    hits = child(data_dir, "search", "volcano lava cooling")
    assert hits[0]["path"] == "kb/glass.md" and "obsidian" in hits[0]["text"]
