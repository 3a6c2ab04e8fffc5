"""The web server (app.web): one FastAPI application, the Gradio page mounted in it, a Host allowlist over all."""

from __future__ import annotations

import httpx
import pytest

from app.web import HostPolicy, host_name


@pytest.mark.parametrize("header, name", [
    ("localhost:7860", "localhost"), ("LocalHost.", "localhost"), ("127.0.0.1", "127.0.0.1"),
    ("[::1]:7860", "::1"), ("example.org:80", "example.org"),
    ("", None), ("a b", None), ("::1", None), ("[::1", None), ("host:port", None), ("x@evil", None),
    ("[::1]x", None),
])
def test_host_name_parses_the_header(header, name):
    assert host_name(header) == name


def test_policy_allows_loopback_bind_host_and_listed_names_only():
    policy = HostPolicy.for_server("192.168.1.5", ["docs.lan"])
    for header in ("localhost:7860", "127.0.0.1:7860", "[::1]:7860", "192.168.1.5:7860", "docs.lan", "DOCS.LAN."):
        assert policy.allows(header), header
    for header in ("rebind.attacker.example", "10.0.0.1", "localhost.attacker.example", None, ""):
        assert not policy.allows(header), header
    wildcard = HostPolicy.for_server("0.0.0.0")
    assert wildcard.allows("10.0.0.7:7860") and wildcard.allows("[fe80::1]:7860")  # literals cannot be rebound
    assert not wildcard.allows("rebind.attacker.example:7860")


@pytest.fixture
def server(make_service, corpus_dir, serve_web):
    service = make_service()
    service.ingest_paths("docs", [str(corpus_dir)])
    return serve_web(service), service


def test_forged_host_is_refused_on_the_page_and_every_api_route(server, tmp_path):
    url, service = server
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "secret.txt").write_text("the launch code is 0000\n")
    forged = {"Host": "rebind.attacker.example"}
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/config").status_code == 200
        assert http.get("/gradio_api/info").status_code == 200
        for method, path, body in [
            ("GET", "/", None), ("GET", "/config", None), ("GET", "/gradio_api/info", None),
            ("POST", "/gradio_api/call/ingest", {"data": [None, "stolen", None, None, str(secret)]}),
            ("POST", "/gradio_api/call/ask", {"data": ["What is the launch code?", "docs", "", False]}),
            ("POST", "/gradio_api/upload", None), ("POST", "/login", None),
        ]:
            response = http.request(method, path, json=body, headers=forged)
            assert response.status_code == 400, (path, response.status_code)
            assert "Invalid Host header" in response.text
    assert "stolen" not in service.collection_names()
    assert service.sessions() == []


def test_allowed_extra_host_name_is_served(make_service, serve_web):
    url = serve_web(make_service())
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/config", headers={"Host": "docs.lan"}).status_code == 400
    url = serve_web(make_service(allowed_hosts=("docs.lan",)))
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/config", headers={"Host": "docs.lan:7860"}).status_code == 200
        assert http.get("/config", headers={"Host": "other.lan"}).status_code == 400


def test_auth_still_guards_the_page_and_the_api(make_service, serve_web):
    from gradio_client import Client

    service = make_service()
    url = serve_web(service, auth=[("ann", "s3cret-pass")])
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/config").status_code == 401
        assert http.post("/login", data={"username": "ann", "password": "wrong"}).status_code == 400
    client = Client(url, auth=("ann", "s3cret-pass"), verbose=False, download_files=False)
    ask = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/ask"]
    assert [p["parameter_name"] for p in ask["parameters"]] == ["question", "collection", "session_id", "pinned",
                                                                 "chunk_reuse"]


def test_a_port_in_use_is_a_user_error():
    import socket

    from fastapi import FastAPI

    from app.errors import AppError
    from app.web import serve_forever

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(AppError, match="could not listen on 127.0.0.1:"):
            serve_forever(FastAPI(), host="127.0.0.1", port=taken.getsockname()[1])
