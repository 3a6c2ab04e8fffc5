"""Errors a user can act on. The CLI prints their message and exits non-zero, without a stack trace."""


class TPAError(Exception):
    """Base class of the engine's user-facing errors (bad model name, corrupt file, prompt too long...)."""
