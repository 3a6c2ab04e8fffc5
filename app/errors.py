"""Errors a user can act on in the app layer (unknown session, empty question...)."""


class AppError(Exception):
    """Base class of the app's user-facing errors."""
