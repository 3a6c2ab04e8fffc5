"""Who owns a chat session made in the web app: the signed-in user with `--auth`, else the browser.

Without auth, each browser gets a random owner token in a cookie (HttpOnly, SameSite=Strict; set by
`app.web.OwnerCookie` on its first request), so two browsers on the same machine never see each other's sessions.
The token is the only key to those sessions: a browser that loses its cookies loses access to them (the CLI,
the local administrator, still sees them). The two kinds of owner are prefixed so one can never pass for the other.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping

from app.errors import AppError

OWNER_COOKIE = "tpa-rag-owner"
OWNER_COOKIE_MAX_AGE_S = 400 * 24 * 3600  # browsers cap cookie lifetimes at 400 days
_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,64}")
MAX_USER_NAME_CHARS = 190


class NoOwnerError(AppError):
    """A web request that carries neither a signed-in user nor a valid owner cookie."""


def new_token() -> str:
    """A fresh browser owner token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def valid_token(value: str | None) -> bool:
    return bool(value) and _TOKEN.fullmatch(value) is not None


def owner_for(username: str | None, cookies: Mapping[str, str]) -> str:
    """The owner of the sessions a web request may use: `user:NAME` with auth, else `browser:TOKEN`."""
    if username:
        if len(username) > MAX_USER_NAME_CHARS:
            raise NoOwnerError(f"user names are at most {MAX_USER_NAME_CHARS} characters")
        return f"user:{username}"
    token = cookies.get(OWNER_COOKIE)
    if valid_token(token):
        return f"browser:{token}"
    raise NoOwnerError("this browser sent no session cookie; reload the page (and allow cookies for this site)")


def set_cookie_value(token: str) -> str:
    """The Set-Cookie header value that gives a browser `token`."""
    return (f"{OWNER_COOKIE}={token}; Path=/; Max-Age={OWNER_COOKIE_MAX_AGE_S}; HttpOnly; SameSite=Strict")
