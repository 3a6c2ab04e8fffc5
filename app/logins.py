"""Password checks for `--auth` that slow repeated failures down.

Every failed login answers only after `failure_delay_s`; after `free_failures` failures in a row for one user
name, that name is locked for a time that doubles with each further failure (up to `max_lock_s`), and while it is
locked every attempt fails without the password being compared, so guessing in parallel gains nothing. A success
clears the name's count. Passwords are compared in constant time, for unknown names too.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_TRACKED_NAMES = 10_000  # failures are remembered for this many user names, the oldest forgotten first


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0


class LoginGuard:
    """`await guard.check(user, password)` -> whether to let the user in (see the module docstring)."""

    def __init__(self, users: Sequence[tuple[str, str]], *, free_failures: int = 3, failure_delay_s: float = 0.5,
                 first_lock_s: float = 2.0, max_lock_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._passwords = {user: password.encode("utf-8") for user, password in users}
        self.free_failures = free_failures
        self.failure_delay_s = failure_delay_s
        self.first_lock_s = first_lock_s
        self.max_lock_s = max_lock_s
        self._clock = clock
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def locked_for(self, user: str) -> float:
        """Seconds until `user` may try again (0 when not locked)."""
        entry = self._failures.get(user)
        return max(0.0, entry.locked_until - self._clock()) if entry else 0.0

    async def check(self, user: str, password: str) -> bool:
        user = user[:256]
        if self.locked_for(user) > 0:
            await asyncio.sleep(self.failure_delay_s)
            return False
        expected = self._passwords.get(user)
        given = password.encode("utf-8", "replace")
        ok = hmac.compare_digest(given, expected if expected is not None else given + b"\0")
        if expected is not None and ok:
            self._failures.pop(user, None)
            return True
        self._failed(user)
        await asyncio.sleep(self.failure_delay_s)
        return False

    def _failed(self, user: str) -> None:
        entry = self._failures.pop(user, None) or _Failures()
        entry.count += 1
        self._failures[user] = entry  # most recent last
        while len(self._failures) > MAX_TRACKED_NAMES:
            self._failures.popitem(last=False)
        extra = entry.count - self.free_failures
        if extra > 0:
            lock = min(self.first_lock_s * 2 ** (extra - 1), self.max_lock_s)
            entry.locked_until = self._clock() + lock
            log.warning("%d failed logins in a row for %r: locked for %.0f s", entry.count, user, lock)
