"""Blobs: exact safetensors round trip, every kind of damage detected, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import torch

from tpa_core.store import blobs
from tpa_core.store.errors import PageCorrupt


def _page(n: int = 5, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layers.0.ak": torch.randn(n, 4, 2, generator=g).to(dtype),
        "layers.0.bk": torch.randn(n, 2, 8, generator=g).to(dtype),
        "layers.1.ak": torch.randn(n, 4, 2, generator=g).to(dtype),
        "layers.1.bk": torch.randn(n, 2, 8, generator=g).to(dtype),
    }


HEADER = {"namespace": "ns", "key": "k" * 64, "kind": "tail", "start": 256, "n_tokens": 5, "parent": "p" * 64}


def _write(tmp_path, tensors=None, header=HEADER):
    data = blobs.encode_page(tensors or _page(), header)
    path = tmp_path / "x" / "page.safetensors"
    blobs.write_atomic(path, data)
    return path, data


def _read(path, data, **over):
    args = {"sha256": hashlib.sha256(data).hexdigest(), "expect": HEADER, "layout": blobs.layout_of(_page())}
    return blobs.read_page(path, **{**args, **over})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact(tmp_path, dtype):
    tensors = _page(dtype=dtype)
    path, data = _write(tmp_path, tensors)
    back = _read(path, data, layout=blobs.layout_of(tensors))
    assert sorted(back) == sorted(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    assert [p.name for p in path.parent.iterdir()] == ["page.safetensors"]  # no temp file left


def test_header_carries_the_page_identity_and_no_pickle(tmp_path):
    path, data = _write(tmp_path)
    header, _ = blobs.read_header(path.read_bytes())
    meta = header["__metadata__"]
    assert meta["format"] == blobs.BLOB_FORMAT and meta["namespace"] == "ns" and meta["start"] == "256"
    assert meta["n_tokens"] == "5" and meta["key"] == "k" * 64 and meta["format_version"] == "1"
    assert b"\x80\x04" not in data[:8 + len(json.dumps(header))]  # no pickle protocol marker in the header


def test_bytes_on_disk_are_the_factor_bytes_plus_a_small_header(tmp_path):
    tensors = _page(n=256)
    path, data = _write(tmp_path, tensors, {**HEADER, "n_tokens": 256})
    factor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert factor_bytes < path.stat().st_size <= factor_bytes + 1024


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    path, data = _write(tmp_path)
    raw = bytearray(data)
    raw[-3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(PageCorrupt, match="checksum"):
        _read(path, data)


def test_truncated_file_is_caught(tmp_path):
    path, data = _write(tmp_path)
    path.write_bytes(data[:20])
    with pytest.raises(PageCorrupt):
        _read(path, data[:20], sha256=hashlib.sha256(data[:20]).hexdigest())


@pytest.mark.parametrize("field,value", [("key", "other"), ("namespace", "other"), ("start", 0),
                                         ("n_tokens", 6), ("kind", "page")])
def test_header_mismatch_is_caught(tmp_path, field, value):
    path, data = _write(tmp_path)
    with pytest.raises(PageCorrupt, match=field):
        _read(path, data, expect={**HEADER, field: value})


def test_names_shapes_and_dtypes_are_checked_against_the_layout(tmp_path):
    path, data = _write(tmp_path)
    layout = blobs.layout_of(_page())
    with pytest.raises(PageCorrupt, match="names"):
        _read(path, data, layout={**layout, "layers.2.bk": ["float32", [2, 8]]})
    with pytest.raises(PageCorrupt, match="dtype"):
        _read(path, data, layout={**layout, "layers.0.bk": ["bfloat16", [2, 8]]})
    with pytest.raises(PageCorrupt, match="shape"):
        _read(path, data, layout={**layout, "layers.0.bk": ["float32", [8, 2]]})


def test_a_well_formed_file_with_a_lying_header_length_is_caught(tmp_path):
    path, data = _write(tmp_path)
    bad = struct.pack("<Q", 10**9) + data[8:]
    path.write_bytes(bad)
    with pytest.raises(PageCorrupt, match="header length"):
        _read(path, bad, sha256=hashlib.sha256(bad).hexdigest())


def test_write_atomic_replaces_and_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "a" / "b.safetensors"
    blobs.write_atomic(path, b"first")
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        blobs.write_atomic(path, b"second, never complete")
    assert calls and path.read_bytes() == b"first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.safetensors"]
