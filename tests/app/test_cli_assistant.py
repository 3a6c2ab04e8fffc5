"""`tpa-rag ask`, `tpa-rag sessions` and `tpa-rag serve` argument handling, in process, on the tiny model."""

from __future__ import annotations

import json

import pytest

from app.cli import main
from app.commands import assistant

QUESTION = "How does the cache store key its entries?"


@pytest.fixture
def cli(monkeypatch, data_dir, corpus_dir, tiny_model, capsys):
    """Run `tpa-rag ...` in process; its ChatService gets the tiny model and the hashing embedder injected."""
    from tiny import HashingEmbedder

    from app.service import ChatService

    def service(settings, *, with_model=True):
        settings = settings.with_(top_k=3, max_new_tokens=12)
        return ChatService(settings, model=tiny_model if with_model else None, embedder=HashingEmbedder(),
                           load_model=with_model)

    monkeypatch.setattr(assistant, "_service", service)
    setup = service(assistant_settings(data_dir))
    setup.ingest_paths("docs", [str(corpus_dir)])
    setup.close()

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["--data-dir", str(data_dir), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assistant_settings(data_dir):
    from app.settings import Settings

    return Settings.from_env({}, data_dir=data_dir)


def test_ask_json_then_follow_up_and_sessions(cli):
    code, out, _ = cli("ask", "--collection", "docs", "--json", QUESTION)
    assert code == 0
    first = json.loads(out)
    assert set(first) == {"answer", "session_id", "sources", "metrics", "left_out"}
    assert set(first["metrics"]) == {"prompt_tokens", "reused_tokens", "chunk_tokens", "recomputed_tokens",
                                     "prefilled_tokens", "ttft_ms", "decode_tokens_per_s", "total_ms"}
    assert all(set(s) == {"path", "start_line", "end_line", "score"} for s in first["sources"])
    code, out, err = cli("ask", "--collection", "docs", "--session", first["session_id"], "--max-new-tokens", "5",
                         "--temperature", "0", "And", "the", "namespace?")
    assert code == 0
    assert f"session: {first['session_id']}" in err and "reused" in err and "[1] " in err
    code, out, _ = cli("sessions", "list", "--json")
    listed = json.loads(out)
    assert [s["id"] for s in listed] == [first["session_id"]] and listed[0]["turns"] == 2
    code, out, _ = cli("sessions", "show", first["session_id"], "--json")
    shown = json.loads(out)
    assert [t["question"] for t in shown["turns_detail"]] == [QUESTION, "And the namespace?"]
    assert shown["turns_detail"][1]["metrics"]["reused_tokens"] > 0
    code, out, _ = cli("sessions", "rename", first["session_id"], "cache keys")
    assert code == 0 and "cache keys" in out
    code, out, _ = cli("sessions", "delete", first["session_id"], "--json")
    assert code == 0 and json.loads(out) == {"deleted": first["session_id"]}
    code, out, _ = cli("sessions", "list")
    assert "no sessions yet" in out


@pytest.mark.parametrize("argv, message", [
    (("ask", "--collection", "docs", "   "), "the question is empty"),
    (("ask", "--collection", "nope", QUESTION), "no collection named 'nope'"),
    (("ask", "--collection", "docs", "--session", "abc", QUESTION), "no such session 'abc'"),
    (("ask", "--collection", "docs", "--top-k", "0", QUESTION), "top-k must be"),
    (("ask", "--collection", "docs", "--pinned", "--document", "nothere.md", QUESTION), "no document"),
    (("sessions", "show", "abc"), "no such session 'abc'"),
    (("sessions", "delete", "abc"), "no such session 'abc'"),
    (("serve", "--auth", "nopassword"), "user:password"),
    (("serve", "--ingest-root", "/no/such/folder/anywhere"), "ingest root '/no/such/folder/anywhere' is not a folder"),
])
def test_user_mistakes_exit_2_with_a_message(cli, argv, message):
    code, out, err = cli(*argv)
    assert code == 2 and message in err and "Traceback" not in err
    assert out == ""


def test_huge_question_is_refused(cli):
    code, _, err = cli("ask", "--collection", "docs", "word " * 3000)
    assert code == 2 and "too long" in err


def test_parse_auth_from_file(tmp_path):
    from app.errors import AppError
    from app.ui import parse_auth

    assert parse_auth("alice:secret") == [("alice", "secret")]
    users = tmp_path / "users"
    users.write_text("# who may use the app\nalice:secret\n\nbob:p:w\n")
    assert parse_auth(str(users)) == [("alice", "secret"), ("bob", "p:w")]
    users.write_text("# nobody\n")
    with pytest.raises(AppError, match="no user:password"):
        parse_auth(str(users))
    assert parse_auth(None) is None
