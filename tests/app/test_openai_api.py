"""The OpenAI-compatible API on a real server (uvicorn on a free loopback port, the tiny model), driven by the
official `openai` client, httpx for what the client hides, and curl for the raw event stream."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from app import web

KEY = "test-key-0123456789abcdef"
QUESTION = "How does the cache store key its entries?"
CHAT_MODEL = "tiny-random"


@pytest.fixture
def api(service, serve_web):
    return serve_web(service).rstrip("/"), service


def start(service) -> web.BackgroundServer:
    return web.start_in_thread(web.build_web_app(service, service.settings))


def client(url: str, key: str = "unused", **options):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60, **options)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def streamed(c, **request) -> tuple[str, list]:
    chunks = list(c.chat.completions.create(stream=True, **request))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, chunks


def test_models_and_plain_chat_streamed_and_not(api):
    url, service = api
    c = client(url)
    assert [m.id for m in c.models.list()] == [CHAT_MODEL, "rag:docs", "pinned:docs"]
    assert c.models.retrieve("rag:docs").id == "rag:docs"
    messages = [{"role": "system", "content": "You answer briefly."}, user("What is the capital of France?")]
    whole = c.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=8)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 8 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert not hasattr(whole, "sources") or whole.sources is None  # a plain chat cites nothing

    text, chunks = streamed(c, model=CHAT_MODEL, messages=messages, max_tokens=8,
                            stream_options={"include_usage": True})
    assert text == choice.message.content  # greedy: the same answer, streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks[:-1]][-1] == choice.finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({ch.id for ch in chunks}) == 1
    # The second identical request restored the whole prompt but its last token from the factor cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1
    # A new conversation with the same system prompt starts from the cached system prompt.
    other = c.chat.completions.create(model=CHAT_MODEL, messages=[messages[0], user("Why is the sky blue?")],
                                      max_tokens=2)
    assert 0 < other.usage.prompt_tokens_details.cached_tokens < whole.usage.prompt_tokens - 8
    assert service.sessions() == []  # the API keeps no sessions: the client has the conversation


def test_a_growing_conversation_reuses_its_prefix_also_after_a_restart(make_service):
    service = make_service()
    running = start(service)
    c = client(running.url.rstrip("/"))
    messages = [user("What is the capital of France?")]
    usages = []
    for follow_up in ("And of Germany?", "Why?"):
        reply = c.chat.completions.create(model=CHAT_MODEL, messages=messages)
        usages.append(reply.usage)
        messages += [assistant(reply.choices[0].message.content), user(follow_up)]
    third = c.chat.completions.create(model=CHAT_MODEL, messages=messages)
    usages.append(third.usage)
    assert usages[0].prompt_tokens_details.cached_tokens == 0
    for before, now in zip(usages, usages[1:]):
        # everything the previous request's cache held: its prompt and its answer (spelled with the generated ids)
        assert now.prompt_tokens_details.cached_tokens == before.prompt_tokens + before.completion_tokens - 1
    running.stop()
    service.close()

    restarted = make_service()  # the same data folder: the store and the recorded answers persist
    running = start(restarted)
    try:
        c = client(running.url.rstrip("/"))
        messages += [assistant(third.choices[0].message.content), user("Thanks.")]
        again = c.chat.completions.create(model=CHAT_MODEL, messages=messages)
        assert again.usage.prompt_tokens_details.cached_tokens == (
            third.usage.prompt_tokens + third.usage.completion_tokens - 1)
        # An answer the client changed is text we did not generate: re-tokenized, the cache still holds the
        # prompt before it.
        edited = messages[:-2] + [assistant(third.choices[0].message.content + " (edited)"), user("Thanks!")]
        reply = c.chat.completions.create(model=CHAT_MODEL, messages=edited)
        cached = reply.usage.prompt_tokens_details.cached_tokens
        assert third.usage.prompt_tokens - 1 <= cached < third.usage.prompt_tokens + third.usage.completion_tokens
    finally:
        running.stop()


def test_collection_chat_cites_sources_and_follows_up(api):
    url, service = api
    c = client(url)
    system = {"role": "system", "content": "Be brief."}  # appended to the collection chat's instructions
    first = c.chat.completions.create(model="rag:docs", messages=[system, user(QUESTION)])
    sources = first.sources
    assert sources and any(s["file"].endswith("cache.md") for s in sources)
    assert {"ref", "file", "start_line", "end_line", "score", "text"} <= set(sources[0])
    assert "chained sha256" in next(s["text"] for s in sources if s["file"].endswith("cache.md"))
    assert first.usage.prompt_tokens_details.cached_tokens == 0

    messages = [system, user(QUESTION),
                assistant(first.choices[0].message.content), user("And what is the namespace?")]
    text, chunks = streamed(c, model="rag:docs", messages=messages, stream_options={"include_usage": True})
    final = next(ch for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    assert text and final.sources and all("file" in s for s in final.sources)
    assert final.left_out == []
    # The follow-up kept the first answer's context in place: its prompt starts with the first request's tokens.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert service.sessions() == []


def test_pinned_collection_chat_reads_whole_documents_and_reuses_them(api):
    url, _ = api
    c = client(url)
    messages = [user("What does the store keep?")]
    first = c.chat.completions.create(model="pinned:docs", messages=messages)
    assert sorted(s["file"] for s in first.sources) == ["corpus/cache.md", "corpus/model.py", "corpus/notes.txt"]
    assert [s["ref"] for s in first.sources] == [1, 2, 3] and first.left_out == []
    messages += [assistant(first.choices[0].message.content), user("And the namespace?")]
    second = c.chat.completions.create(model="pinned:docs", messages=messages)
    # the documents, the first question and the first answer (its generated ids) all came from the cache
    assert second.usage.prompt_tokens_details.cached_tokens == (
        first.usage.prompt_tokens + first.usage.completion_tokens - 1)


def test_embeddings_in_the_embedders_tokens(api):
    url, service = api
    c = client(url)
    name = service.corpus.embedder.name
    texts = ["The cache keeps pages.", "Paris is the capital of France."]
    many = c.embeddings.create(model=name, input=texts)  # the client asks for base64 and decodes it
    expected = service.corpus.embedder.embed(texts)
    assert [d.index for d in many.data] == [0, 1]
    np.testing.assert_array_equal(np.array([d.embedding for d in many.data], dtype=np.float32), expected)
    assert many.usage.prompt_tokens == sum(service.corpus.embedder.count_tokens(texts)) == 4 + 6
    one = c.embeddings.create(model=name, input=texts[0], encoding_format="float")
    assert one.data[0].embedding == pytest.approx(expected[0].tolist())


@pytest.fixture
def keyed_api(make_service, corpus_dir, serve_web):
    service = make_service(api_keys=(KEY,))
    service.ingest_paths("docs", [str(corpus_dir)])
    url = serve_web(service, api_options={"max_body_bytes": 64 * 1024, "max_pending": 2})
    return url.rstrip("/"), service


def error_of(call) -> tuple[int, dict, httpx.Headers]:
    import openai

    with pytest.raises(openai.APIStatusError) as caught:
        call()
    response = caught.value.response
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return response.status_code, body["error"], response.headers


def test_keys_and_every_error_status(keyed_api):
    url, service = keyed_api
    good = client(url, KEY)
    assert [m.id for m in good.models.list()] == [CHAT_MODEL, "rag:docs", "pinned:docs"]
    status, error, headers = error_of(lambda: client(url, "not-the-key-0123456789").models.list())
    assert status == 401 and error["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
    for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        anonymous = httpx.get(f"{url}/v1/models", headers=headers)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    status, _, _ = error_of(lambda: client(url, "x").chat.completions.create(model=CHAT_MODEL,
                                                                              messages=[user("hi")]))
    assert status == 401

    chat = good.chat.completions.create
    bad_requests = [
        (dict(model=CHAT_MODEL, messages=[user("hi")], n=2), "n"),
        (dict(model=CHAT_MODEL, messages=[user("hi")], temperature=3), "temperature"),
        (dict(model=CHAT_MODEL, messages=[]), "messages"),
        (dict(model=CHAT_MODEL, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]),
         "messages[0].role"),
        (dict(model=CHAT_MODEL, messages=[user("hi")],
              tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
        (dict(model=CHAT_MODEL, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), "messages[0].content[1]"),
        (dict(model=CHAT_MODEL, messages=[user("hi")], max_tokens=0), "max_tokens"),
        (dict(model="rag:docs", messages=[user("hi"), assistant("hello")]), "messages[1].role"),
        (dict(model=CHAT_MODEL, messages=[user("tokens " * 2500)]), "messages"),
    ]
    for request, param in bad_requests:
        status, error, _ = error_of(lambda request=request: chat(**request))
        assert (status, error["param"]) == (400, param), error
        assert error["type"] == "invalid_request_error" and error["message"]
    assert error["code"] == "context_length_exceeded"
    raw = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"

    status, error, _ = error_of(lambda: chat(model="gpt-4o", messages=[user("hi")]))
    assert (status, error["param"], error["code"]) == (404, "model", "model_not_found")
    status, error, _ = error_of(lambda: good.embeddings.create(model="text-embedding-3-small", input="hi"))
    assert status == 404 and service.corpus.embedder.name in error["message"]
    missing = httpx.get(f"{url}/v1/assistants", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"

    status, error, _ = error_of(lambda: chat(model=CHAT_MODEL, messages=[user("x" * 70_000)]))
    assert (status, error["code"]) == (413, "request_too_large")

    # 503: the model worker is busy (a stand-in for a long generation); two requests may wait, the third is refused.
    gate = threading.Event()
    service._worker.submit(gate.wait)
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(chat, model=CHAT_MODEL, messages=[user(f"question {i}")]) for i in range(2)]
        for _ in range(200):
            if service._worker._jobs.qsize() >= 1:
                break
            threading.Event().wait(0.02)
        status, error, headers = error_of(lambda: chat(model=CHAT_MODEL, messages=[user("one more")]))
        assert (status, error["type"], headers["retry-after"]) == (503, "server_error", "2")
        gate.set()
        assert all(f.result().choices[0].message.content for f in waiting)
    assert service.sessions() == []


def test_concurrent_requests_are_answered_whole_and_unmixed(api):
    url, _ = api
    c = client(url)
    questions = [f"Question number {i}: what does the store keep?" for i in range(3)]
    alone = [c.chat.completions.create(model=CHAT_MODEL, messages=[user(q)], max_tokens=6).choices[0].message.content
             for q in questions]
    assert len(set(alone)) == len(alone)  # distinct answers: a mix-up would show
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(
            lambda q: streamed(c, model=CHAT_MODEL, messages=[user(q)], max_tokens=6)[0], questions))
    assert together == alone


def test_a_queued_stream_starts_at_once_and_is_kept_alive(api, monkeypatch):
    import app.service

    url, service = api
    monkeypatch.setattr(app.service, "HEARTBEAT_S", 0.1)
    gate = threading.Event()
    service._worker.submit(gate.wait)  # a stand-in for another client's long generation
    body = {"model": CHAT_MODEL, "stream": True, "max_tokens": 3, "messages": [user("hello")]}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
            assert response.status_code == 200  # the headers came while the job waits its turn
            lines = response.iter_lines()
            assert json.loads(next(lines)[len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
            assert [next(lines), next(lines)] == ["", ": waiting for the model"]
            gate.set()
            rest = [line for line in lines if line.startswith("data: ")]
    finally:
        gate.set()
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"]


def test_a_client_that_goes_away_stops_the_generation_and_frees_its_place(service, serve_web):
    url = serve_web(service, api_options={"max_pending": 1}).rstrip("/")
    body = {"model": CHAT_MODEL, "stream": True, "max_tokens": 1000, "messages": [user("Tell a long story.")]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the answer has started
    service._run_on_worker(lambda: None)  # returns once the abandoned job has stopped
    assert service._cache.length(0) < 200  # prompt and a few tokens, far from the 1,000 asked for
    # the one place in the queue is free again: the next request is answered, not refused with 503
    reply = client(url).chat.completions.create(model=CHAT_MODEL, messages=[user("hi")], max_tokens=2)
    assert reply.choices[0].message.content is not None


def test_one_port_serves_the_api_and_the_gradio_ask_endpoint(api):
    """gradio_client with its defaults (it downloads what looks like a file) against `/ask`, beside `/v1`."""
    from gradio_client import Client

    url, _ = api
    result = Client(url, verbose=False).predict(QUESTION, "docs", api_name="/ask")
    assert any(s["file"].endswith("cache.md") for s in result["sources"])
    assert [m.id for m in client(url).models.list()] == [CHAT_MODEL, "rag:docs", "pinned:docs"]
    forged = httpx.get(f"{url}/v1/models", headers={"Host": "attacker.example"})
    assert forged.status_code == 400  # the Host allowlist stands in front of /v1 too


def test_raw_event_stream_framing_with_curl(api):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    url, _ = api
    body = json.dumps({"model": "rag:docs", "stream": True, "max_tokens": 6, "messages": [user(QUESTION)]})
    done = subprocess.run(["curl", "-sS", "-N", "-H", "Content-Type: application/json", "-d", body,
                           f"{url}/v1/chat/completions", "-D", "-"], capture_output=True, timeout=60, check=True)
    head, _, stream = done.stdout.decode().partition("\r\n\r\n")
    assert "content-type: text/event-stream" in head.lower()
    assert stream.endswith("data: [DONE]\n\n")
    events = [e for e in stream.split("\n\n")[:-1] if not e.startswith(": ")]  # comments: waiting for the model
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["sources"]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)


@pytest.mark.parametrize("argv, message", [
    (("--host", "0.0.0.0"), "give --auth and --api-key too"),
    (("--host", "192.168.1.5", "--auth", "alice:secret"), "give --api-key too"),
    (("--host", "0.0.0.0", "--api-key", KEY), "give --auth too"),
    (("--api-key", "short"), "at least 16 characters"),
])
def test_serve_refuses_an_unprotected_public_address_or_a_weak_key(argv, message, data_dir, capsys):
    from app.cli import main

    assert main(["--data-dir", str(data_dir), "serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("public", [False, True])
def test_serve_serves_the_api(public, monkeypatch, data_dir, tiny_model, tmp_path, capsys):
    """`tpa-rag serve` with keys from a file; or bound to all interfaces, unprotected on request (containers)."""
    from tiny import HashingEmbedder

    from app.cli import main
    from app.commands import assistant
    from app.service import ChatService

    monkeypatch.setattr(assistant, "_service", lambda settings, with_model=True: ChatService(
        settings.with_(max_new_tokens=4), model=tiny_model, embedder=HashingEmbedder()))
    seen = {}

    def serve_briefly(server, *, host, port):
        running = web.start_in_thread(server, "127.0.0.1", 0)
        try:
            url = running.url.rstrip("/")
            seen["models"] = [m.id for m in client(url, KEY).models.list()]
            seen["anonymous"] = httpx.get(f"{url}/v1/models").status_code
        finally:
            running.stop()

    monkeypatch.setattr(web, "serve_forever", serve_briefly)
    keys = tmp_path / "keys"
    keys.write_text(f"# who may use the API\n{KEY}\n")
    argv = ["--host", "0.0.0.0", "--allow-unprotected"] if public else ["--api-key", str(keys)]
    assert main(["--data-dir", str(data_dir), "serve", *argv]) == 0
    assert seen == {"models": [CHAT_MODEL], "anonymous": 200 if public else 401}
    assert ("without --auth and --api-key (--allow-unprotected)" in capsys.readouterr().err) == public
