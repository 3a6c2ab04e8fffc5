"""Errors a user can act on. The CLI prints their message and exits non-zero, without a stack trace."""


class RetrievalError(Exception):
    """Base class of retrieval's user-facing errors (unknown collection, unreadable path...)."""
