"""Errors a user can act on in the app layer (unknown session, empty question...)."""

from __future__ import annotations


class AppError(Exception):
    """Base class of the app's user-facing errors."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every package's user-facing error classes: their message is shown as it is, never a traceback."""
    from retrieval.errors import RetrievalError
    from tpa_core.errors import TPAError

    return (AppError, TPAError, RetrievalError)
