"""Settings: environment variables, overrides, and a clear error for a malformed value."""

from __future__ import annotations

import pytest

from app.cli import main
from app.errors import AppError
from app.settings import Settings


def test_environment_and_overrides(tmp_path):
    env = {"TPA_RAG_HOME": str(tmp_path), "TPA_RAG_TOP_K": "9", "TPA_RAG_TEMPERATURE": "0.25", "TPA_RAG_MODEL": "m"}
    settings = Settings.from_env(env, model="override")
    assert (settings.top_k, settings.temperature, settings.model) == (9, 0.25, "override")
    assert settings.data_dir == tmp_path.resolve()
    assert settings.db_url == f"sqlite:///{tmp_path.resolve() / 'tpa_rag.sqlite'}"


def test_malformed_number_names_the_variable(tmp_path):
    with pytest.raises(AppError, match="TPA_RAG_MAX_NEW_TOKENS"):
        Settings.from_env({"TPA_RAG_HOME": str(tmp_path), "TPA_RAG_MAX_NEW_TOKENS": "lots"})


def test_cli_reports_a_malformed_setting_without_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TPA_RAG_TOP_K", "many")
    assert main(["--data-dir", str(tmp_path), "models", "list"]) == 2
    err = capsys.readouterr().err
    assert "TPA_RAG_TOP_K" in err and "Traceback" not in err


def test_the_ingest_chunk_cap_reaches_the_corpus(tmp_path):
    from app.errors import AppError
    from app.service import ChatService

    settings = Settings.from_env({"TPA_RAG_MAX_INGEST_CHUNKS": "7"}, data_dir=tmp_path)
    assert settings.ingest_limits().max_chunks == 7
    service = ChatService(settings, load_model=False, embedder=object())
    try:
        assert service.corpus.limits.max_chunks == 7
    finally:
        service.close()
    with pytest.raises(AppError, match="TPA_RAG_MAX_INGEST_CHUNKS"):
        Settings.from_env({"TPA_RAG_MAX_INGEST_CHUNKS": "0"}, data_dir=tmp_path).ingest_limits()


def test_server_policy_settings_from_the_environment(tmp_path):
    import os

    (tmp_path / "a").mkdir()
    env = {"TPA_RAG_HOME": str(tmp_path / "data"), "TPA_RAG_ALLOWED_HOSTS": "docs.lan, ,wiki.lan",
           "TPA_RAG_INGEST_ROOTS": os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b")]),
           "TPA_RAG_MODELS": "qwen,  ,/models/x.gguf"}
    settings = Settings.from_env(env)
    assert settings.allowed_hosts == ("docs.lan", "wiki.lan")
    assert settings.ingest_roots == ((tmp_path / "a").resolve(), (tmp_path / "b").resolve())
    assert settings.models == ("qwen", "/models/x.gguf")
    assert Settings.from_env({"TPA_RAG_HOME": str(tmp_path)}).ingest_roots == ()


def test_chunk_reuse_is_left_to_the_device_unless_the_variable_decides(tmp_path):
    home = {"TPA_RAG_HOME": str(tmp_path)}
    assert Settings.from_env(home).chunk_reuse is None
    assert Settings.from_env({**home, "TPA_RAG_CHUNK_REUSE": "0"}).chunk_reuse is False
    assert Settings.from_env({**home, "TPA_RAG_CHUNK_REUSE": "on"}).chunk_reuse is True
    with pytest.raises(AppError, match="TPA_RAG_CHUNK_REUSE"):
        Settings.from_env({**home, "TPA_RAG_CHUNK_REUSE": "sometimes"})
