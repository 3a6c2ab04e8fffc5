"""What web visitors may ingest and switch to: server paths only inside the operator's ingest roots, models only
from the operator's list (refusals that say nothing about the file system), uploads that never overwrite each
other and that leave Gradio's temporary folder once saved."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from app.intake import NotAllowedError


@pytest.fixture
def outside(tmp_path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.conf").write_text("password = hunter2\n")
    return folder


@pytest.fixture
def root(tmp_path, corpus_dir) -> Path:
    root = tmp_path / "shared"
    root.mkdir()
    os.rename(corpus_dir, root / "corpus")
    return root


def test_without_ingest_roots_server_paths_are_refused(make_service, outside):
    service = make_service()
    with pytest.raises(NotAllowedError, match="uploads only"):
        service.ingest("stolen", local_path=str(outside))
    assert "stolen" not in service.collection_names()


def test_server_paths_only_inside_a_root_and_refusals_reveal_nothing(make_service, root, outside):
    service = make_service(ingest_roots=(root,))
    (root / "escape").symlink_to(outside, target_is_directory=True)

    def refusal(path: str) -> str:
        with pytest.raises(NotAllowedError) as info:
            service.ingest("stolen", local_path=path)
        return str(info.value).replace(repr(path), "PATH")

    inside_data = make_service(ingest_roots=(service.settings.data_dir.parent,))
    with pytest.raises(NotAllowedError, match="not inside a folder this server may ingest"):
        inside_data.ingest("stolen", local_path=str(service.settings.data_dir))  # databases, caches, uploads
    answers = {refusal(p) for p in (str(outside), str(outside / "missing"), "/no/such/folder", str(root / "escape"),
                                    str(root / ".." / "outside"), "../outside", "corpus/\0")}
    assert len(answers) == 1 and "not inside a folder this server may ingest" in answers.pop()
    assert "stolen" not in service.collection_names()
    summary = service.ingest("docs", local_path=str(root / "corpus"))
    assert {d["path"] for d in summary["documents"]} == {"corpus/cache.md", "corpus/model.py", "corpus/notes.txt"}
    assert service.ingest("docs2", local_path="corpus")["documents"]  # relative: inside the first root


def test_model_switching_only_to_offered_models(make_service, tmp_path):
    service = make_service(models=("other-model",))
    before = service.model_name
    assert service.model_choices()[0] == before and service.model_choices()[-1] == "other-model"
    real = tmp_path / "model.gguf"
    real.write_bytes(b"GGUF")

    def refusal(name: str) -> str:
        with pytest.raises(NotAllowedError) as info:
            service.switch_model(name)
        return str(info.value).replace(repr(name), "NAME")

    assert refusal(str(real)) == refusal(str(tmp_path / "missing.gguf")) == refusal("/etc")
    assert service.model_name == before
    with pytest.raises(Exception) as offered:  # an offered name passes the check (and fails to load here)
        service.switch_model("other-model")
    assert not isinstance(offered.value, NotAllowedError)


def test_two_uploads_with_the_same_name_are_both_kept(make_service, tmp_path):
    service = make_service()
    for folder, text in (("a", "Alpha says the store keeps pages.\n"), ("b", "Beta says the index is FAISS.\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "README.md").write_text(text)
    summary = service.ingest("docs", uploads=[tmp_path / "a" / "README.md", tmp_path / "b" / "README.md"])
    paths = sorted(d["path"] for d in summary["documents"])
    assert len(paths) == 2 and all(p.endswith("/README.md") for p in paths) and paths[0] != paths[1]
    texts = {d.text for d in service.corpus.document_texts("docs", None)}
    assert texts == {"Alpha says the store keeps pages.\n", "Beta says the index is FAISS.\n"}
    again = service.ingest("docs", uploads=[tmp_path / "a" / "README.md"])  # the same file again: one document
    assert [d["path"] for d in again["documents"]] == [p for p in paths if "Alpha" in _text(service, p)]
    assert len(service.document_paths("docs")) == 2


def _text(service, path: str) -> str:
    return service.corpus.document_texts("docs", [path])[0].text


def test_uploads_leave_gradios_temporary_folder_once_saved(make_service, serve_web, tmp_path):
    from gradio.utils import get_upload_folder
    from gradio_client import Client, handle_file

    from app import ui

    service = make_service()
    name = f"guide-{uuid.uuid4().hex}.md"
    (tmp_path / name).write_text("# Guide\n\nThe guide says the cache keeps pages on disk.\n")
    client = Client(serve_web(service), verbose=False, download_files=False)
    summary, *_ = client.predict(None, "guides", [handle_file(str(tmp_path / name))], None, "", api_name="/ingest")
    assert "1 file indexed" in summary
    assert not list(Path(get_upload_folder()).rglob(name)), "the upload is still in Gradio's temporary folder"
    assert ui.build_app(service).delete_cache == ui.TEMP_SWEEP_S
