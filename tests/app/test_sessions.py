"""Sessions and turns: persisted, listed newest first, resumed by a new store on the same database, deleted."""

from __future__ import annotations

import pytest

from app.database import make_engine
from app.errors import AppError
from app.sessions import SessionStore, UnknownSessionError


@pytest.fixture
def store(data_dir):
    return SessionStore(make_engine(f"sqlite:///{data_dir / 'db.sqlite'}"))


def test_create_turns_and_resume_after_restart(store, data_dir):
    first = store.create("docs")
    second = store.create("code", name="code talk")
    store.add_turn(first.id, "What is TPA?", "A factorized attention.", mode="retrieval",
                   sources=[{"path": "a.md", "start_line": 1, "end_line": 3, "score": 0.5}],
                   metrics={"prompt_tokens": 10, "reused_tokens": 0})
    store.add_turn(first.id, "And the cache?", "It stores factors.", mode="pinned", sources=[],
                   metrics={"prompt_tokens": 20, "reused_tokens": 12}, left_out=["b.md lines 1-9"])

    reopened = SessionStore(make_engine(f"sqlite:///{data_dir / 'db.sqlite'}"))
    listed = reopened.list()
    assert [s.id for s in listed] == [first.id, second.id]  # most recently used first
    assert listed[0].n_turns == 2 and listed[0].name == "What is TPA?"
    assert [s.id for s in reopened.list(collection="code")] == [second.id]
    turns = reopened.turns(first.id)
    assert [t.position for t in turns] == [0, 1]
    assert turns[0].sources[0]["path"] == "a.md"
    assert turns[1].metrics["reused_tokens"] == 12 and turns[1].mode == "pinned"
    assert turns[1].left_out == ["b.md lines 1-9"]


def test_rename_delete_and_unknown_ids(store):
    info = store.create("docs")
    assert store.rename(info.id, "  my   notes ").name == "my notes"
    with pytest.raises(AppError, match="too long"):
        store.rename(info.id, "x" * 500)
    assert store.get(info.id).name == "my notes"
    assert store.set_pinned_documents(info.id, ["a.md", "b.py"]).pinned_documents == ["a.md", "b.py"]
    store.add_turn(info.id, "q", "a", mode="retrieval", sources=[], metrics={})
    gone = store.delete(info.id)
    assert gone.n_turns == 1 and gone.pinned_documents == ["a.md", "b.py"]
    for call in (store.get, store.turns, store.delete):
        with pytest.raises(UnknownSessionError, match="no such session"):
            call(info.id)
    with pytest.raises(UnknownSessionError):
        store.add_turn(info.id, "q", "a", mode="retrieval", sources=[], metrics={})
    with pytest.raises(UnknownSessionError):
        store.get("")
    assert store.list() == []
