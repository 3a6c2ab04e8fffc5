"""Sessions have owners: a web visitor reaches only their own sessions (page, private handlers and /ask), the CLI
sees all, and an old database without owners migrates."""

from __future__ import annotations

import json
import secrets

import httpx
import pytest
from sqlalchemy import text

from app.owners import OWNER_COOKIE, NoOwnerError, owner_for
from app.sessions import SessionStore, UnknownSessionError

QUESTION = "How does the cache store key its entries?"


@pytest.fixture
def engine(data_dir):
    from app.database import make_engine

    engine = make_engine(f"sqlite:///{data_dir / 'db.sqlite'}")
    yield engine
    engine.dispose()


def fn_index(http: httpx.Client, name: str) -> int:
    """The index of the page's event handler `name` (what the browser sends to run it)."""
    for dep in http.get("/config").json()["dependencies"]:
        if dep.get("api_name") == name:
            return dep["id"]
    raise KeyError(name)


def queue_call(http: httpx.Client, name: str, data: list, session_hash: str = "") -> dict:
    """Run a page handler as the browser does (queue join, then its event stream); the final message, with the
    notifications the page showed meanwhile under "logs". One `session_hash` = one page (tab) for Gradio: what a
    handler changed on it is there for the next call."""
    session_hash = session_hash or secrets.token_hex(6)
    join = http.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index(http, name),
                                                      "session_hash": session_hash, "event_data": None})
    assert join.status_code == 200, join.text
    logs = []
    with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "log":
                    logs.append(message.get("log", ""))
                if message.get("msg") == "process_completed":
                    return {**message, "logs": logs}
    raise AssertionError("the event stream ended without a result")


def shown(result: dict) -> str:
    """What a handler's call put on the page: its outputs (or error) and its notices, not its timings."""
    output = result["output"]
    return json.dumps([output.get("data", output.get("error")), result["logs"]])


@pytest.fixture
def two_visitors(make_service, corpus_dir, serve_web):
    from gradio_client import Client

    service = make_service()
    service.ingest_paths("docs", [str(corpus_dir)])
    url = serve_web(service)
    alice = Client(url, verbose=False, download_files=False)
    mine = alice.predict(QUESTION, "docs", api_name="/ask")
    with httpx.Client(base_url=url, timeout=60) as mallory:
        yield service, url, alice, mine, mallory


def test_a_second_visitor_sees_and_reaches_nothing_of_the_first(two_visitors):
    from gradio_client import Client
    from gradio_client.exceptions import AppError as ClientError

    service, url, alice, mine, mallory = two_visitors
    sid = mine["session_id"]
    page = mallory.get("/config").text
    assert sid not in page and QUESTION not in page
    tab = secrets.token_hex(6)
    loaded = queue_call(mallory, "on_load", ["docs"], tab)
    assert loaded["success"] and sid not in json.dumps(loaded["output"])
    for name, data in [("on_resume", [sid, "docs"]), ("on_rename", [sid, "mine now", "docs"]),
                       ("on_delete_session", [sid, "docs"])]:
        result = queue_call(mallory, name, data, tab)
        # Refused: by Gradio's own check of the picked value, or with a notice and no change (a user mistake
        # fails no component; these handlers read the session from the tab's state, which is empty here).
        assert not result["success"] or result["logs"], (name, result)
        assert QUESTION not in json.dumps(result), name
        unknown = queue_call(mallory, name, [data[0].replace(sid, "0" * 32), *data[1:]], tab)
        assert shown(unknown).replace("0" * 32, sid) == shown(result), name
    with pytest.raises(ClientError, match="no such session"):
        Client(url, verbose=False, download_files=False).predict("And the namespace?", "docs", sid, api_name="/ask")
    # Nothing changed, and the owner still has it all.
    info, turns = service.session(sid)
    assert info.name == QUESTION[:60] and len(turns) == 1
    follow = alice.predict("And the namespace?", "docs", sid, api_name="/ask")
    assert follow["session_id"] == sid and follow["metrics"]["reused_tokens"] > 0
    assert [s.id for s in service.sessions()] == [sid]  # the CLI (administrator) sees every session


def test_the_owner_resumes_and_lists_their_sessions_in_the_page(two_visitors):
    _, url, alice, mine, _ = two_visitors
    own = httpx.Client(base_url=url, cookies=alice.cookies, timeout=60)
    tab = secrets.token_hex(6)
    loaded = queue_call(own, "on_load", ["docs"], tab)
    assert mine["session_id"] in json.dumps(loaded["output"])
    resumed = queue_call(own, "on_resume", [mine["session_id"], "docs"], tab)
    assert resumed["success"] and QUESTION in json.dumps(resumed["output"])
    own.close()


def test_owner_cookie_is_http_only_and_same_site_strict(two_visitors):
    _, url, *_ = two_visitors
    response = httpx.get(url)
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith(OWNER_COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    again = httpx.get(url, cookies=response.cookies)
    assert not any(c.startswith(OWNER_COOKIE) for c in again.headers.get_list("set-cookie"))  # kept, not renewed
    # A link followed from another site arrives without the Strict cookie: the browser's token must survive it.
    linked = httpx.get(url, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert linked.status_code == 200 and not linked.headers.get_list("set-cookie")


def test_with_auth_each_user_owns_their_sessions(make_service, corpus_dir, serve_web):
    from gradio_client import Client
    from gradio_client.exceptions import AppError as ClientError

    service = make_service()
    service.ingest_paths("docs", [str(corpus_dir)])
    url = serve_web(service, auth=[("ann", "ann-password"), ("bob", "bob-password")])
    ann = Client(url, auth=("ann", "ann-password"), verbose=False, download_files=False)
    first = ann.predict(QUESTION, "docs", api_name="/ask")
    assert service.session(first["session_id"])[0].owner == "user:ann"
    bob = Client(url, auth=("bob", "bob-password"), verbose=False, download_files=False)
    with pytest.raises(ClientError, match="no such session"):
        bob.predict("And the namespace?", "docs", first["session_id"], api_name="/ask")
    # Ann from another browser (a new login, a new cookie) still reaches her session.
    again = Client(url, auth=("ann", "ann-password"), verbose=False, download_files=False)
    assert again.predict("And the namespace?", "docs", first["session_id"], api_name="/ask")["session_id"] \
        == first["session_id"]


def test_owner_for():
    assert owner_for("ann", {}) == "user:ann"
    token = "a" * 43
    assert owner_for(None, {OWNER_COOKIE: token}) == f"browser:{token}"
    for cookies in ({}, {OWNER_COOKIE: "short"}, {OWNER_COOKIE: "x" * 43 + ";"}):
        with pytest.raises(NoOwnerError):
            owner_for(None, cookies)


def test_store_checks_owners(engine):
    store = SessionStore(engine)
    mine = store.create("docs", owner="browser:" + "a" * 43)
    cli = store.create("docs")
    other = "browser:" + "b" * 43
    for call in (lambda: store.get(mine.id, other), lambda: store.turns(mine.id, other),
                 lambda: store.rename(mine.id, "x", other), lambda: store.delete(mine.id, other),
                 lambda: store.set_pinned_documents(mine.id, [], other), lambda: store.get(cli.id, other)):
        with pytest.raises(UnknownSessionError, match=f"^no such session {mine.id!r}$|^no such session {cli.id!r}$"):
            call()
    assert [s.id for s in store.list(owner=other)] == []
    assert [s.id for s in store.list(owner=mine.owner)] == [mine.id]
    assert {s.id for s in store.list()} == {mine.id, cli.id}
    assert store.get(mine.id, mine.owner).id == mine.id


OLD_SCHEMA = [
    """CREATE TABLE app_sessions (id VARCHAR(32) NOT NULL PRIMARY KEY, name VARCHAR(200) NOT NULL,
       collection VARCHAR(200) NOT NULL, pinned_documents JSON NOT NULL, created_at DATETIME NOT NULL,
       updated_at DATETIME NOT NULL)""",
    "CREATE INDEX ix_app_sessions_collection ON app_sessions (collection)",
    "CREATE INDEX ix_app_sessions_updated_at ON app_sessions (updated_at)",
    """CREATE TABLE app_turns (id INTEGER NOT NULL PRIMARY KEY, session_id VARCHAR(32) NOT NULL
       REFERENCES app_sessions (id) ON DELETE CASCADE, position INTEGER NOT NULL, question TEXT NOT NULL,
       answer TEXT NOT NULL, answer_ids JSON NOT NULL, mode VARCHAR(16) NOT NULL, sources JSON NOT NULL,
       context JSON NOT NULL, metrics JSON NOT NULL, left_out JSON NOT NULL, created_at DATETIME NOT NULL)""",
    "INSERT INTO app_sessions VALUES ('0123456789abcdef0123456789abcdef', 'old', 'docs', '[]', "
    "'2026-01-01 00:00:00', '2026-01-01 00:00:00')",
    "INSERT INTO app_turns VALUES (1, '0123456789abcdef0123456789abcdef', 0, 'q?', 'a.', '[]', 'retrieval', "
    "'[]', '[]', '{}', '[]', '2026-01-01 00:00:00')",
]


def test_a_database_from_before_owners_migrates(engine):
    with engine.begin() as conn:
        for statement in OLD_SCHEMA:
            conn.execute(text(statement))
    store = SessionStore(engine)
    old = "0123456789abcdef0123456789abcdef"
    info = store.get(old)
    assert info.owner is None and info.name == "old" and len(store.turns(old)) == 1
    assert store.list(owner="browser:" + "a" * 43) == []  # owned by nobody: the CLI's only
    with pytest.raises(UnknownSessionError):
        store.get(old, "user:ann")
    new = store.create("docs", owner="user:ann")
    assert [s.id for s in store.list(owner="user:ann")] == [new.id]
    SessionStore(engine)  # a second start (or replica) finds the column and changes nothing
