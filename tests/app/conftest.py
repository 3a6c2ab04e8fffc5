"""Fixtures of the app's tests: a ChatService on a tiny random model and a hashing embedder, and a small corpus."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from corpus_texts import CACHE_DOC, MODEL_CODE, NOTES
from tiny import HashingEmbedder, tiny_loaded_model


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "cache.md").write_text(CACHE_DOC)
    (folder / "model.py").write_text(MODEL_CODE)
    (folder / "notes.txt").write_text(NOTES)
    return folder


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_loaded_model()


@pytest.fixture
def make_service(data_dir, tiny_model):
    """Build ChatServices on one data directory (a second one = the app after a restart); all are closed."""
    from app.service import ChatService
    from app.settings import Settings

    made = []

    def make(model=None, embedder=None, **settings_overrides):
        values = {"top_k": 3, "max_new_tokens": 12, "temperature": 0.0}
        values.update(settings_overrides)
        max_upload = values.pop("max_upload_bytes", 1024 * 1024)
        service = ChatService(Settings(data_dir=data_dir, **values), model=model or tiny_model,
                              embedder=embedder or HashingEmbedder(), max_upload_bytes=max_upload)
        made.append(service)
        return service

    yield make
    for service in made:
        service.close()


@pytest.fixture
def service(make_service, corpus_dir):
    service = make_service()
    service.ingest_paths("docs", [str(corpus_dir)])
    return service


@pytest.fixture
def serve_web():
    """Serve a ChatService's web app (app.web) on a free loopback port; returns its URL. All are stopped."""
    from app import web

    running = []

    def serve(service, **options) -> str:
        server = web.start_in_thread(web.build_web_app(service, service.settings, **options))
        running.append(server)
        return server.url

    yield serve
    for server in running:
        server.stop()
