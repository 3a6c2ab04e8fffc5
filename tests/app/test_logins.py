"""Failed logins are slowed down and a user name under attack is locked for a growing time (app.logins)."""

from __future__ import annotations

import asyncio
import time

import httpx

from app.logins import LoginGuard


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_guard_locks_a_name_after_repeated_failures_and_doubles_the_lock():
    clock = FakeClock()
    guard = LoginGuard([("ann", "right")], free_failures=3, failure_delay_s=0, first_lock_s=2, max_lock_s=5,
                       clock=clock)
    check = lambda user, password: asyncio.run(guard.check(user, password))  # noqa: E731 - a short alias
    assert check("ann", "right")
    assert [check("ann", "wrong") for _ in range(3)] == [False] * 3 and guard.locked_for("ann") == 0
    assert not check("ann", "wrong") and guard.locked_for("ann") == 2
    assert not check("ann", "right")  # locked: the right password is not even compared
    clock.now += 2
    assert not check("ann", "wrong") and guard.locked_for("ann") == 4  # doubled
    clock.now += 4
    assert not check("ann", "wrong") and guard.locked_for("ann") == 5  # capped
    clock.now += 5
    assert check("ann", "right") and guard.locked_for("ann") == 0  # a success clears the count
    assert [check("ann", "wrong") for _ in range(3)] == [False] * 3 and guard.locked_for("ann") == 0
    assert not check("nobody", "x") and not check("ann", "")


def test_thirty_wrong_logins_are_slowed_and_lock_the_name(make_service, serve_web):
    url = serve_web(make_service(), auth=[("ann", "s3cret-pass")])

    async def attack() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            answers = await asyncio.gather(*(http.post("/login", data={"username": "ann", "password": f"guess{i}"})
                                             for i in range(30)))
        return [a.status_code for a in answers]

    started = time.perf_counter()
    assert asyncio.run(attack()) == [400] * 30
    assert time.perf_counter() - started >= 0.5  # each failure answers after a delay (was: 30 in 0.03 s)
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/login", data={"username": "ann", "password": "s3cret-pass"}).status_code == 400  # locked
        assert http.get("/config").status_code == 401
