"""Errors a user can act on. The CLI prints their message and exits non-zero, without a stack trace.

A file that cannot be ingested (binary, too large, unreadable...) is not an error: it is reported as skipped with
its reason and the rest of the ingestion goes on. These exceptions are for mistakes that stop the request itself.
"""


class RetrievalError(Exception):
    """Base class of retrieval's user-facing errors (unknown collection, unreadable path...)."""


class UnknownCollectionError(RetrievalError):
    """The named collection does not exist."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no collection named {name!r}; create it by ingesting into it, or list them with "
                         f"`tpa-rag collections list`")
        self.name = name


class InvalidCollectionNameError(RetrievalError):
    """A collection name with characters we do not accept."""

    def __init__(self, name: str) -> None:
        super().__init__(f"invalid collection name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
                         f"starting with a letter or digit")
        self.name = name


class SourceNotFoundError(RetrievalError):
    """A path given to ingest does not exist."""

    def __init__(self, path: str) -> None:
        super().__init__(f"no such file or folder: {path}")
        self.path = path


class EmbeddingModelMismatchError(RetrievalError):
    """The collection was indexed with another embedding model than the one in use."""

    def __init__(self, collection: str, indexed_with: str, in_use: str) -> None:
        super().__init__(f"collection {collection!r} was indexed with the embedding model {indexed_with!r}, but "
                         f"{in_use!r} is in use; use the same model, or delete and re-ingest the collection")


class EmbeddingModelError(RetrievalError):
    """The embedding model could not be loaded."""


class UnknownDocumentError(RetrievalError):
    """A document path that the collection does not hold."""

    def __init__(self, collection: str, paths: list[str]) -> None:
        shown = ", ".join(repr(p) for p in paths[:5]) + (" ..." if len(paths) > 5 else "")
        super().__init__(f"collection {collection!r} has no document {shown}; list them with `list_documents`")
        self.paths = paths


class InvalidQueryError(RetrievalError):
    """An empty query or a non-positive k."""
