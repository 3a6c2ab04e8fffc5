"""Keys: stable across processes and machines, typed, chained, separated by namespace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpa_core.store.errors import StoreError
from tpa_core.store.keys import PAGE_TOKENS, chain_keys, namespace_key, page_key, token_bytes

ROPE = {"rope_theta": 10000.0, "rope_style": "rotate_half"}
# Golden values: a key is a promise to every machine that ever wrote a page. If one of these changes, the
# key format changed and FORMAT_VERSION must be bumped. Computed for blob format 1, given explicitly: the key
# function must keep giving them whatever the current format is.
GOLDEN_NS = "fe41f40c593a08b47b802b8ba6bb95df90ccfd855e66d2f0b437e97bb90ae5f7"
GOLDEN_PAGE = "83002e425073b4b6e136681bf2a6626614f1eecfaf3d15b13171edbea66fa529"
GOLDEN_TAIL = "8995eaac5f5ab47d62ff5f220147574ffdb4acbd84a132346ea0d00c5a70307c"


def _ns() -> str:
    return namespace_key("fp", "float32", ROPE, format_version=1, config={"d_model": 32})


def test_keys_match_golden_values():
    ns = _ns()
    assert ns == GOLDEN_NS
    assert page_key(ns, None, list(range(PAGE_TOKENS))) == GOLDEN_PAGE
    assert page_key(ns, None, [1, 2, 3], kind="tail") == GOLDEN_TAIL


def test_keys_are_the_same_in_another_process_with_another_hash_seed():
    code = ("from tpa_core.store.keys import namespace_key, page_key;"
            "ns = namespace_key('fp', 'float32', {'rope_style': 'rotate_half', 'rope_theta': 10000.0},"
            " format_version=1, config={'d_model': 32});"
            "print(ns, page_key(ns, None, list(range(256))))")
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": os.pathsep.join([str(root), str(root / "kernels")])})
    assert out.stdout.split() == [GOLDEN_NS, GOLDEN_PAGE]


def test_token_bytes_are_little_endian_uint32():
    assert token_bytes([1, 256, 2**32 - 1]) == b"\x01\x00\x00\x00\x00\x01\x00\x00\xff\xff\xff\xff"
    with pytest.raises(StoreError):
        token_bytes([-1])
    with pytest.raises(StoreError):
        token_bytes([2**32])


@pytest.mark.parametrize("change", [
    {"fingerprint": "fp2"},
    {"factor_dtype": "bfloat16"},
    {"rope": {**ROPE, "rope_theta": 500000.0}},
    {"rope": {**ROPE, "rope_style": "t6"}},
    {"format_version": 2},
    {"config": {"d_model": 64}},
    {"numerics": "residual=float32"},
])
def test_namespace_changes_with_every_input(change):
    args = {"fingerprint": "fp", "factor_dtype": "float32", "rope": ROPE, "format_version": 1,
            "config": {"d_model": 32}}
    base = namespace_key(**args)
    assert namespace_key(**{**args, **change}) != base


def test_empty_numerics_keeps_the_earlier_key():
    args = {"fingerprint": "fp", "factor_dtype": "float32", "rope": ROPE, "config": {"d_model": 32}}
    assert namespace_key(**args, numerics="") == namespace_key(**args)


def test_page_keys_are_chained_and_typed():
    ns = _ns()
    a = list(range(PAGE_TOKENS))
    b = list(range(PAGE_TOKENS, 2 * PAGE_TOKENS))
    k1 = page_key(ns, None, a)
    assert page_key(ns, k1, b) != page_key(ns, None, b)  # the parent is part of the key
    assert chain_keys(ns, a + b + [1, 2]) == [k1, page_key(ns, k1, b)]
    assert page_key(ns, None, a, extras={"adapter": 1}) != k1
    assert page_key(ns, None, a, extras={"adapter": 1}) != page_key(ns, None, a, extras={"adapter": True})
    assert page_key(ns, None, a, extras={"adapter": "1"}) != page_key(ns, None, a, extras={"adapter": 1})
    assert page_key(_ns(), None, [5, 6], kind="tail") != page_key(_ns().upper(), None, [5, 6], kind="tail")
    # Length-prefixed fields: moving bytes between fields changes the key.
    assert page_key(ns, "ab", [1], kind="tail") != page_key(ns, "a", [1], kind="tail")


def test_page_key_rejects_bad_input():
    ns = _ns()
    with pytest.raises(StoreError, match="full page"):
        page_key(ns, None, [1, 2, 3])
    with pytest.raises(StoreError, match="tail"):
        page_key(ns, None, list(range(PAGE_TOKENS)), kind="tail")
    with pytest.raises(StoreError, match="kind"):
        page_key(ns, None, [1], kind="chunk")
    with pytest.raises(StoreError, match="extras"):
        page_key(ns, None, [1], kind="tail", extras={"x": 1.5})
    with pytest.raises(StoreError, match="fingerprint"):
        namespace_key("", "float32", ROPE)
