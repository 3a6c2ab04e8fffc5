"""The web app launched on 127.0.0.1, driven with gradio_client: ingest, ask (streamed), follow-up, isolation,
errors a person can act on."""

from __future__ import annotations

import socket

import pytest

QUESTION = "How does the cache store key its entries?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(make_service, corpus_dir, serve_web):
    service = make_service()
    service.ingest_paths("docs", [str(corpus_dir)])
    return serve_web(service), service


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)  # gradio_client's defaults, downloading files included


def test_api_ask_streams_and_follow_up_reuses_the_cache(app_url):
    url, service = app_url
    c = client(url)
    job = c.submit(QUESTION, "docs", "", False, api_name="/ask")
    outputs = list(job)
    final = job.result()
    assert final == outputs[-1]
    assert set(final) == {"answer", "session_id", "sources", "metrics", "left_out"}
    assert len(outputs) >= 2 and all(o["metrics"] is None for o in outputs[:-1])  # streamed, then the result
    assert any(s["file"].endswith("cache.md") for s in final["sources"])
    assert all(set(s) == {"file", "start_line", "end_line", "score"} for s in final["sources"])
    assert final["metrics"]["reused_tokens"] == 0 and final["metrics"]["prompt_tokens"] > 0
    follow = c.predict("And what is the namespace?", "docs", final["session_id"], False, api_name="/ask")
    assert follow["session_id"] == final["session_id"]
    assert follow["metrics"]["reused_tokens"] > 0
    # A second browser session starts its own chat session and never sees the first one's turns.
    other = client(url).predict("What is the capital of France?", "docs", api_name="/ask")
    assert other["session_id"] != final["session_id"]
    assert [t.question for t in service.session(other["session_id"])[1]] == ["What is the capital of France?"]
    assert len(service.session(final["session_id"])[1]) == 2
    # chunk_reuse on for one ask: the metrics say where its tokens came from (exact pages win where they cover).
    m = c.predict("What is a page key?", "docs", "", False, True, api_name="/ask")["metrics"]
    assert m["reused_tokens"] + m["chunk_tokens"] + m["recomputed_tokens"] + m["prefilled_tokens"] == \
        m["prompt_tokens"]
    assert m["prefilled_tokens"] > 0


def test_api_errors_are_messages_and_change_nothing(app_url):
    from gradio_client.exceptions import AppError as ClientError

    url, service = app_url
    c = client(url)
    first = c.predict(QUESTION, "docs", api_name="/ask")
    cases = [
        (("  ", "docs"), "the question is empty"),
        (("why? " * 3000, "docs"), "too long"),
        ((QUESTION, "nope"), "no collection named 'nope'"),
        ((QUESTION, "docs", "f" * 32), "no such session"),
    ]
    for args, message in cases:
        with pytest.raises(ClientError, match=message):
            c.predict(*args, api_name="/ask")
    assert [s.id for s in service.sessions()] == [first["session_id"]]
    assert len(service.session(first["session_id"])[1]) == 1


def test_ingest_endpoint_uploads_and_reports_skipped(app_url, tmp_path):
    from gradio_client import handle_file

    url, service = app_url
    good = tmp_path / "guide.md"
    good.write_text("# Guide\n\nThe guide says the cache keeps pages on disk.\n")
    summary, *_ = client(url).predict(None, "guides", [handle_file(str(good))], None, "", api_name="/ingest")
    assert "**guides**: 1 file indexed" in summary
    assert "guides" in service.collection_names()
    answer = client(url).predict("What does the guide say?", "guides", api_name="/ask")
    assert [s["file"].split("/")[-1] for s in answer["sources"]] == ["guide.md"]  # in its upload's folder


def test_api_reports_what_was_left_out_and_refuses_what_cannot_fit(make_service, tmp_path, serve_web):
    from gradio_client.exceptions import AppError as ClientError
    from tiny import tiny_loaded_model

    service = make_service(model=tiny_loaded_model(window=512), max_new_tokens=32)
    big = tmp_path / "big"
    big.mkdir()
    (big / "long.md").write_text("".join(f"Line {i}: the cache keeps pages of tokens.\n" for i in range(300)))
    service.ingest_paths("big", [str(big)])
    c = client(serve_web(service))
    result = c.predict("What does the cache keep?", "big", "", True, api_name="/ask")
    assert any(item.startswith("big/long.md lines ") for item in result["left_out"])
    assert result["metrics"]["prompt_tokens"] <= 512 - 32
    with pytest.raises(ClientError, match="does not fit the model's context window"):
        c.predict("tokens " * 900, "big", result["session_id"], True, api_name="/ask")
    assert len(service.session(result["session_id"])[1]) == 1
