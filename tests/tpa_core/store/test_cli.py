"""`tpa-rag cache stats|verify|gc|clear`, in process, on a store filled by the tiny model."""

from __future__ import annotations

import json

import pytest
from store_workload import namespace, open_store, prefill_paged, prompt

from app.cli import main


@pytest.fixture
def filled(db_url, data_dir, tiny_model, monkeypatch):
    """A data dir whose store (on `db_url`) holds two prompts' pages; the CLI reads the same settings."""
    monkeypatch.setenv("TPA_RAG_DATABASE_URL", db_url if not db_url.startswith("sqlite") else "")
    url = db_url if not db_url.startswith("sqlite") else f"sqlite:///{data_dir / 'tpa_rag.sqlite'}"
    store = open_store(url, data_dir / "blobs")
    ns = namespace(store)
    for seed in (1, 2):
        ids = prompt(seed, 600)
        store.save(ns, ids, prefill_paged(tiny_model, ids)[0])
        store.restore(ns, ids, tiny_model.new_cache())
    return store


def _run(capsys, data_dir, *argv) -> tuple[int, dict]:
    code = main(["--data-dir", str(data_dir), "cache", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_verify_json_reports_every_entry(filled, data_dir, capsys):
    code, out = _run(capsys, data_dir, "verify")
    assert code == 0
    assert out == {"entries": 6, "ok": 6, "corrupt": 0, "quarantined": 0, "bytes": filled.stats().bytes}

    page = filled.lookup(namespace(filled), prompt(2, 600))[1]
    raw = bytearray((filled.blobs_dir / page.path).read_bytes())
    raw[-1] ^= 0xFF
    (filled.blobs_dir / page.path).write_bytes(bytes(raw))
    code, out = _run(capsys, data_dir, "verify")
    assert code == 1
    assert out == {"entries": 6, "ok": 5, "corrupt": 1, "quarantined": 1, "bytes": filled.stats().bytes}


def test_stats_gc_and_clear(filled, data_dir, capsys):
    code, stats = _run(capsys, data_dir, "stats")
    assert code == 0 and stats["entries"] == 6 and stats["hits"] == 6 and stats["hit_rate"] == 1.0
    assert stats["bytes"] > 0 and stats["budget_bytes"] == 4 * 1024**3
    assert stats["chunk_caches"] == {"entries": 0, "bytes": 0, "pinned": 0}  # prefix pages only here

    stray = filled.blobs_dir / "stray.safetensors"
    stray.write_bytes(b"orphan")
    code, done = _run(capsys, data_dir, "gc")  # (opening the store already reconciles: the orphan goes)
    assert code == 0 and not stray.exists() and done["evicted"] == 0 and "quarantine_purged" in done

    ns = namespace(filled)
    filled.pin(filled.prefix_keys(ns, prompt(1, 600)), "session:1")
    code, out = _run(capsys, data_dir, "clear")
    assert code == 0 and out == {"removed": 3}  # the pinned prompt's three pages stay
    code, out = _run(capsys, data_dir, "clear", "--all")
    assert out == {"removed": 3}
    code, stats = _run(capsys, data_dir, "stats")
    assert stats["entries"] == 0 and stats["hits"] == 0


def test_text_output_and_usage(filled, data_dir, capsys):
    assert main(["--data-dir", str(data_dir), "cache", "stats"]) == 0
    assert "hit rate" in capsys.readouterr().out
    assert main(["--data-dir", str(data_dir), "cache"]) == 2
