"""Stable, typed keys: namespaces and chained page keys.

Every key is a sha256 over *typed, length-prefixed* fields, so that two different inputs can never encode to the
same bytes (no `"ab" + "c" == "a" + "bc"` collisions), and nothing depends on the process, the machine's byte
order or Python's per-process string hash seed. The same inputs give the same key on every machine.

- namespace = H("tpa-rag/namespace", fingerprint, factor dtype, RoPE settings, format version, config[, numerics])
- page key  = H("tpa-rag/page", namespace, parent key, kind, token ids as little-endian uint32, extras)
- chunk key = H("tpa-rag/chunk", namespace, prefix token ids, chunk token ids, reference position)

`kind` is "page" (a full page of PAGE_TOKENS tokens) or "tail" (the partial last page of a prefix); it is part
of the hash so the two families never collide.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tpa_core.store.errors import StoreError

PAGE_TOKENS = 256  # tokens per page; a prefix is stored as full pages plus at most one partial "tail"
FORMAT_VERSION = 2  # the blob layout and checksum; bumping it moves every model to a fresh namespace
KINDS = ("page", "tail")

_MAX_TOKEN_ID = 2**32 - 1
ExtraValue = str | int | bool | bytes


def _field(tag: bytes, payload: bytes) -> bytes:
    """One typed field: a 1-byte tag, an 8-byte little-endian length, the payload."""
    return tag + struct.pack("<Q", len(payload)) + payload


def _str(value: str) -> bytes:
    return _field(b"S", value.encode("utf-8"))


def _int(value: int) -> bytes:
    return _field(b"I", str(int(value)).encode("ascii"))


def _extra(value: ExtraValue) -> bytes:
    if isinstance(value, bool):  # bool before int: True must not hash like 1
        return _field(b"b", b"1" if value else b"0")
    if isinstance(value, int):
        return _int(value)
    if isinstance(value, str):
        return _str(value)
    if isinstance(value, bytes):
        return _field(b"B", value)
    raise StoreError(f"key extras must be str, int, bool or bytes; got {type(value).__name__} ({value!r})")


def _extras(extras: Mapping[str, ExtraValue] | None) -> bytes:
    items = sorted((extras or {}).items())
    return _int(len(items)) + b"".join(_str(str(k)) + _extra(v) for k, v in items)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def token_bytes(token_ids: Iterable[int]) -> bytes:
    """Token ids as little-endian uint32 bytes (4 per token), the same on every machine."""
    ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
    try:
        packed = array("I", ids) if array("I").itemsize == 4 else array("L", ids)
    except (OverflowError, TypeError) as exc:
        raise StoreError(f"token ids must be integers in [0, {_MAX_TOKEN_ID}]: {exc}") from None
    if packed.itemsize != 4:  # pragma: no cover - no supported platform lacks a 4-byte unsigned array type
        raise StoreError("this platform has no 4-byte unsigned integer array type")
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def namespace_key(
    fingerprint: str,
    factor_dtype: str,
    rope: Mapping[str, Any],
    *,
    format_version: int = FORMAT_VERSION,
    config: Mapping[str, Any] | None = None,
    numerics: str = "",
) -> str:
    """The namespace of a (model, factor dtype, RoPE settings, blob format) combination, as 64 hex digits.

    `fingerprint` identifies weights, tokenizer and chat template (tpa_core.loading computes it); `config` is the
    model config as a plain mapping (everything in it separates namespaces too); `numerics` says how the factors
    were computed beyond their dtype (`tpa_core.model.numerics_tag`; "" adds nothing, so such keys are those of
    earlier builds). A change in any of them is a different namespace, so a page written for one model or RoPE
    setting is never read for another.
    """
    if not fingerprint:
        raise StoreError("a namespace needs a non-empty model fingerprint")
    h = hashlib.sha256()
    h.update(_str("tpa-rag/namespace"))
    h.update(_str(fingerprint))
    h.update(_str(str(factor_dtype)))
    h.update(_str(canonical_json(dict(rope))))
    h.update(_int(format_version))
    h.update(_str(canonical_json(dict(config or {}))))
    if numerics:
        h.update(_str(numerics))
    return h.hexdigest()


def page_key(
    namespace: str,
    parent: str | None,
    token_ids: Sequence[int],
    *,
    kind: str = "page",
    extras: Mapping[str, ExtraValue] | None = None,
) -> str:
    """The key of one page: chained over the parent page's key, so it names the whole prefix up to its end.

    `token_ids` are the page's own tokens (PAGE_TOKENS for a full page, fewer for a tail); `extras` are typed
    values that change the factors without changing the tokens (none today; kept in the hash for what comes).
    """
    if kind not in KINDS:
        raise StoreError(f"unknown page kind {kind!r}; expected one of {KINDS}")
    data = token_bytes(token_ids)
    n = len(data) // 4
    if kind == "page" and n != PAGE_TOKENS:
        raise StoreError(f"a full page holds {PAGE_TOKENS} tokens; got {n}")
    if kind == "tail" and not 0 < n < PAGE_TOKENS:
        raise StoreError(f"a tail holds 1..{PAGE_TOKENS - 1} tokens; got {n}")
    h = hashlib.sha256()
    h.update(_str("tpa-rag/page"))
    h.update(_str(namespace))
    h.update(_str(parent or ""))
    h.update(_str(kind))
    h.update(_field(b"T", data))
    h.update(_extras(extras))
    return h.hexdigest()


def chunk_key(namespace: str, prefix_ids: Sequence[int], chunk_ids: Sequence[int], reference: int) -> str:
    """The key of a chunk cache (`tpa_core.store.chunks`): the chunk's tokens encoded after `prefix_ids`, its
    first token at `reference`. Its own family: it never equals a page key."""
    h = hashlib.sha256()
    h.update(_str("tpa-rag/chunk"))
    h.update(_str(namespace))
    h.update(_field(b"T", token_bytes(prefix_ids)))
    h.update(_field(b"T", token_bytes(chunk_ids)))
    h.update(_int(reference))
    return h.hexdigest()


def chain_keys(
    namespace: str, token_ids: Sequence[int], *, extras: Mapping[str, ExtraValue] | None = None
) -> list[str]:
    """Keys of the full pages of `token_ids`, in order: key i names tokens [0, (i + 1) * PAGE_TOKENS)."""
    ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
    keys: list[str] = []
    parent: str | None = None
    for start in range(0, len(ids) - PAGE_TOKENS + 1, PAGE_TOKENS):
        parent = page_key(namespace, parent, ids[start : start + PAGE_TOKENS], extras=extras)
        keys.append(parent)
    return keys
