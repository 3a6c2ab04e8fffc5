"""The cache panel's numbers: bytes per token, which sessions pin how much, and unpinning from there."""

from __future__ import annotations

import pytest

from app.errors import AppError


def test_usage_names_the_sessions_that_pin_pages_and_unpin_releases_them(service):
    first = service.ask("How does the cache store key its entries?", "docs")
    second = service.ask("What is the capital of France?", "docs")
    usage = service.cache_usage(service.sessions())
    assert usage["tokens"] > 0 and usage["bytes_per_token"] == pytest.approx(usage["bytes"] / usage["tokens"])
    pinned = {s["session_id"]: s for s in usage["sessions"]}
    assert set(pinned) == {first.session_id, second.session_id}
    assert all(s["bytes"] > 0 and s["tokens"] >= first.metrics["prompt_tokens"] // 2 for s in pinned.values())
    assert usage["pinned_bytes"] > 0

    only_first = service.cache_usage([service.session(first.session_id)[0]])
    assert [s["session_id"] for s in only_first["sessions"]] == [first.session_id]  # others' sessions stay hidden

    assert service.unpin_session(first.session_id) > 0
    after = service.cache_usage(service.sessions())
    assert [s["session_id"] for s in after["sessions"]] == [second.session_id]
    assert service.session(first.session_id)[1]  # the chat itself is kept
    with pytest.raises(AppError):
        service.unpin_session("no-such-session")
