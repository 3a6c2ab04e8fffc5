"""Errors a user can act on in the app layer (unknown session, empty question...)."""

from __future__ import annotations


class AppError(Exception):
    """Base class of the app's user-facing errors."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types whose message is shown to the user as is (no stack trace): the app's, the engine's
    and retrieval's."""
    from retrieval.errors import RetrievalError
    from tpa_core.errors import TPAError

    return (AppError, TPAError, RetrievalError)
