"""`tpa-rag ask` through a server running on the same data folder: no model load in the CLI, same output."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request

import pytest

from app import local_server
from app.cli import main


class NoInProcessAsk(Exception):
    pass


@pytest.fixture
def served(service, serve_web, monkeypatch):
    """The app served with a local token and its server.json written, as `serve` does."""
    token = local_server.new_token()
    url = serve_web(service, local_token=token)
    entry = local_server.LocalServer(url.replace("localhost", "127.0.0.1"), os.getpid(), service.settings.model,
                                     token)
    local_server.write_server_file(service.settings.data_dir, entry)

    def refuse(*args, **kwargs):
        raise NoInProcessAsk

    monkeypatch.setattr("app.commands.assistant._service", refuse)  # an in-process ask would load the model
    return service, entry


def cli(capsys, service, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--data-dir", str(service.settings.data_dir), "--model", service.settings.model, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ask_streams_from_the_running_server(served, capsys):
    service, entry = served
    code, out, err = cli(capsys, service, "ask", "--collection", "docs", "How does the cache store key entries?")
    assert code == 0, err
    assert "prompt " in err and "session: " in err and "[1] " in err
    [session] = service.sessions()
    assert session.n_turns == 1  # the server answered and saved the turn
    code, out, err = cli(capsys, service, "ask", "--json", "--collection", "docs", "--session", session.id,
                         "And the namespace?")
    result = json.loads(out)
    assert code == 0 and result["session_id"] == session.id and result["metrics"]["reused_tokens"] > 0
    assert set(result) == {"answer", "session_id", "sources", "metrics", "left_out"}
    assert set(result["sources"][0]) == {"path", "start_line", "end_line", "score"}


def test_user_mistakes_come_back_as_cli_errors(served, capsys):
    service, _ = served
    code, _, err = cli(capsys, service, "ask", "--collection", "nope", "anything?")
    assert code == 2 and "tpa-rag: error:" in err and "nope" in err


def test_no_server_opt_out_answers_in_process(served, capsys):
    service, _ = served
    with pytest.raises(NoInProcessAsk):
        cli(capsys, service, "ask", "--no-server", "--collection", "docs", "a question?")
    os.environ["TPA_RAG_USE_SERVER"] = "0"
    try:
        with pytest.raises(NoInProcessAsk):
            cli(capsys, service, "ask", "--collection", "docs", "a question?")
    finally:
        del os.environ["TPA_RAG_USE_SERVER"]


def test_only_a_live_private_matching_server_file_is_used(served, tmp_path):
    service, entry = served
    data = service.settings.data_dir
    assert local_server.find_server(data, entry.model) == entry
    assert local_server.find_server(data, "another-model") is None
    path = data / local_server.SERVER_FILE
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    assert local_server.find_server(data, entry.model) is None  # readable by others: not trusted
    dead = local_server.LocalServer(entry.url, 2**22 + 12345, entry.model, local_server.new_token())
    local_server.write_server_file(data, dead)
    assert local_server.find_server(data, entry.model) is None  # no such process
    local_server.remove_server_file(data, entry)  # not ours any more: kept
    assert path.exists()
    local_server.remove_server_file(data, dead)
    assert not path.exists()


def test_the_route_needs_the_token_and_a_loopback_host(served):
    service, entry = served

    def post(headers: dict) -> int:
        request = urllib.request.Request(entry.url + "local/ask", method="POST", headers=headers,
                                         data=json.dumps({"question": "q?", "collection": "docs"}).encode())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert post({local_server.TOKEN_HEADER: "0" * 64}) == 403
    assert post({}) == 403
    assert post({local_server.TOKEN_HEADER: entry.token, "Host": "rebind.attacker.example"}) == 400
