"""Mistakes in the environment or the arguments end as `tpa-rag: error: ...` with exit status 2, never a stack
trace, and an ask about a collection that does not exist fails before any model is loaded or fetched."""

from __future__ import annotations

import pytest

from app.cli import main

QUESTION = "How does the cache store key its entries?"


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    _, err = capsys.readouterr()
    return code, err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("tpa-rag: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_data_dir_that_is_a_file(capsys, tmp_path):
    afile = tmp_path / "not-a-folder"
    afile.write_text("x")
    assert_user_error(*run(capsys, "--data-dir", str(afile), "sessions", "list"), "is a file, not a folder")
    assert_user_error(*run(capsys, "--data-dir", str(afile / "data"), "collections", "list"), "is a file")


def test_device_cuda_without_cuda(capsys, data_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_user_error(*run(capsys, "--data-dir", str(data_dir), "--device", "cuda", "sessions", "list"),
                      "--device cuda", "--device cpu")


@pytest.mark.parametrize("url, fragment", [
    ("garbage", "is not a database URL"),
    ("mysql://root:hunter2@localhost/tpa", "names a 'mysql' database"),
    ("postgresql://tpa:hunter2@127.0.0.1:1/tpa_rag", "cannot use the database postgresql://tpa:***@127.0.0.1:1"),
])
def test_bad_or_unreachable_database(capsys, monkeypatch, data_dir, url, fragment):
    monkeypatch.setenv("TPA_RAG_DATABASE_URL", url)
    code, err = run(capsys, "--data-dir", str(data_dir), "sessions", "list")
    assert_user_error(code, err, fragment)
    assert "hunter2" not in err


def test_ingest_with_an_empty_path_is_refused(capsys, data_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # what '' would have ingested
    (tmp_path / "private.md").write_text("# not for the collection\n")
    assert_user_error(*run(capsys, "--data-dir", str(data_dir), "ingest", "--collection", "x", ""), "empty PATH")
    assert_user_error(*run(capsys, "--data-dir", str(data_dir), "ingest", "--collection", "x", ".", "  "),
                      "empty PATH")


def test_ask_checks_its_arguments_before_loading_the_model(capsys, monkeypatch, data_dir, corpus_dir):
    from tiny import HashingEmbedder

    from app.commands import assistant
    from app.service import ChatService
    from app.settings import Settings

    loads: list[str] = []

    def no_load(self, name):  # stands for `models fetch` + conversion: minutes on a fresh machine
        loads.append(name)
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ChatService, "_load", no_load)
    monkeypatch.setattr(assistant, "_service", lambda settings, *, with_model=True: ChatService(
        settings, embedder=HashingEmbedder(), load_model=with_model))
    setup = ChatService(Settings.from_env({}, data_dir=data_dir), embedder=HashingEmbedder(), load_model=False)
    setup.ingest_paths("docs", [str(corpus_dir)])
    setup.close()
    base = ("--data-dir", str(data_dir), "ask")
    for argv, message in [
        (("--collection", "nope", QUESTION), "no collection named 'nope'"),
        (("--collection", "docs", "--session", "f" * 32, QUESTION), "no such session"),
        (("--collection", "docs", "--pinned", "--document", "missing.md", QUESTION), "no document 'missing.md'"),
        (("--collection", "docs", "--top-k", "0", QUESTION), "top-k must be"),
        (("--collection", "docs", " "), "the question is empty"),
    ]:
        assert_user_error(*run(capsys, *base, *argv), message)
    assert loads == []
