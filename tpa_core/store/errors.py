"""The store's errors: `StoreError` for what a user can act on; `PageCorrupt` stays inside the store."""

from __future__ import annotations

from tpa_core.errors import TPAError


class StoreError(TPAError):
    """A store request that cannot be served: bad token ids, a cache that does not fit the namespace, a bad budget."""


class PageCorrupt(Exception):
    """A blob that failed verification (checksum, header, names, shapes or dtypes). Never leaves the store:
    the page is quarantined and counted as a miss."""
