"""Blobs: exact round trip straight from and into tensor memory, every kind of damage detected, atomic writes,
files that are not regular never block a reader."""

from __future__ import annotations

import json
import os
import struct
import threading

import pytest
import torch

from tpa_core.store import blobs
from tpa_core.store.errors import PageCorrupt
from tpa_core.store.keys import FORMAT_VERSION


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
    path = tmp_path / "x" / "page.safetensors"
    nbytes, checksum = blobs.write_page(path, tensors or _page(), header)
    return path, nbytes, checksum


def _read(path, nbytes, checksum, **over):
    args = {"nbytes": nbytes, "checksum": checksum, "expect": HEADER, "layout": blobs.layout_of(_page())}
    return blobs.read_page(path, **{**args, **over})


def _rewrite(path, data: bytes) -> dict:
    """Put `data` in the page's place; returns the read arguments an index recording it would give."""
    path.write_bytes(data)
    return {"nbytes": len(data), "checksum": blobs.checksum_of(data)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact(tmp_path, dtype):
    tensors = _page(dtype=dtype)
    path, nbytes, checksum = _write(tmp_path, tensors)
    assert nbytes == path.stat().st_size == blobs.page_nbytes(tensors, HEADER)
    assert checksum == blobs.checksum_of(path.read_bytes()) and checksum.startswith("xxh3-128:")
    back = _read(path, nbytes, checksum, layout=blobs.layout_of(tensors))
    assert sorted(back) == sorted(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    assert [p.name for p in path.parent.iterdir()] == ["page.safetensors"]  # no temp file left


def test_a_page_is_a_plain_safetensors_file(tmp_path):
    from safetensors.torch import load_file

    tensors = _page(dtype=torch.bfloat16)
    path, _, _ = _write(tmp_path, tensors)
    back = load_file(path)
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_writes_from_and_reads_into_views_of_a_larger_buffer(tmp_path):
    """What the store does with a live cache: pages are slices of the token axis of `[L, B, T_cap, ...]`."""
    g = torch.Generator().manual_seed(1)
    storage = torch.randn(2, 3, 40, 2, 8, generator=g)  # [L, B, T_cap, R, D]
    views = {f"layers.{i}.bk": storage[i, 1, 10:15] for i in range(2)}  # [5, 2, 8] each, no copy
    assert blobs.byte_view(views["layers.0.bk"]).obj is not None
    path, nbytes, checksum = _write(tmp_path, views)
    layout = blobs.layout_of(views)

    target = torch.zeros_like(storage)
    dest = {f"layers.{i}.bk": blobs.byte_view(target[i, 2, 20:25]) for i in range(2)}
    blobs.read_page_into(path, dest, nbytes=nbytes, checksum=checksum, expect=HEADER, layout=layout)
    assert torch.equal(target[:, 2, 20:25], storage[:, 1, 10:15])
    target[:, 2, 20:25] = 0
    assert not target.any()  # nothing outside the destinations was touched


def test_header_carries_the_page_identity_and_no_pickle(tmp_path):
    path, _, _ = _write(tmp_path)
    data = path.read_bytes()
    header, _ = blobs.read_header(data)
    meta = header["__metadata__"]
    assert meta["format"] == blobs.BLOB_FORMAT and meta["namespace"] == "ns" and meta["start"] == "256"
    assert meta["n_tokens"] == "5" and meta["key"] == "k" * 64 and meta["format_version"] == str(FORMAT_VERSION)
    assert b"\x80\x04" not in data[:8 + len(json.dumps(header))]  # no pickle protocol marker in the header


def test_bytes_on_disk_are_the_factor_bytes_plus_a_small_header(tmp_path):
    tensors = _page(n=256)
    path, _, _ = _write(tmp_path, tensors, {**HEADER, "n_tokens": 256})
    factor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert factor_bytes < path.stat().st_size <= factor_bytes + 1024


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    path, nbytes, checksum = _write(tmp_path)
    for at in (nbytes - 3, 8 + 40, 3):  # in the data, in the header text, in the header length
        raw = bytearray(path.read_bytes())
        raw[at] ^= 0x10
        path.write_bytes(bytes(raw))
        with pytest.raises(PageCorrupt, match="checksum|header"):
            _read(path, nbytes, checksum)
        raw[at] ^= 0x10
        path.write_bytes(bytes(raw))
    _read(path, nbytes, checksum)


def test_truncated_file_is_caught(tmp_path):
    path, nbytes, checksum = _write(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(PageCorrupt, match="bytes, the index says"):
        _read(path, nbytes, checksum)
    # an index that recorded the short file (checksum and size of it): the header promises more than is there
    with pytest.raises(PageCorrupt, match="data section"):
        _read(path, **_rewrite(path, data[:-7]))
    with pytest.raises(PageCorrupt, match="header length"):
        _read(path, **_rewrite(path, data[:20]))


@pytest.mark.parametrize("field,value", [("key", "other"), ("namespace", "other"), ("start", 0),
                                         ("n_tokens", 6), ("kind", "page"), ("parent", "")])
def test_header_mismatch_is_caught(tmp_path, field, value):
    path, nbytes, checksum = _write(tmp_path)
    with pytest.raises(PageCorrupt, match=field):
        _read(path, nbytes, checksum, expect={**HEADER, field: value})


def test_an_earlier_format_version_is_never_read(tmp_path, monkeypatch):
    monkeypatch.setattr(blobs, "FORMAT_VERSION", FORMAT_VERSION - 1)
    path, nbytes, checksum = _write(tmp_path)
    monkeypatch.undo()
    with pytest.raises(PageCorrupt, match="format_version"):
        _read(path, nbytes, checksum)


def test_names_shapes_and_dtypes_are_checked_against_the_layout(tmp_path):
    path, nbytes, checksum = _write(tmp_path)
    layout = blobs.layout_of(_page())
    with pytest.raises(PageCorrupt, match="names"):
        _read(path, nbytes, checksum, layout={**layout, "layers.2.bk": ["float32", [2, 8]]})
    with pytest.raises(PageCorrupt, match="dtype"):
        _read(path, nbytes, checksum, layout={**layout, "layers.0.bk": ["bfloat16", [2, 8]]})
    with pytest.raises(PageCorrupt, match="shape"):
        _read(path, nbytes, checksum, layout={**layout, "layers.0.bk": ["float32", [8, 2]]})


def _with_table(data: bytes, edit) -> bytes:
    """The blob with its header table changed by `edit(table)` (same data section)."""
    header, start = blobs.read_header(data)
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[start:]


def test_a_header_that_lies_about_shapes_or_offsets_is_caught_even_with_a_matching_checksum(tmp_path):
    path, _, _ = _write(tmp_path)
    data = path.read_bytes()

    def same_bytes_other_shape(table):
        table["layers.0.bk"]["shape"] = [5, 8, 2]

    def overlap(table):
        table["layers.1.ak"]["data_offsets"] = [0, table["layers.1.ak"]["data_offsets"][1]
                                                - table["layers.1.ak"]["data_offsets"][0]]

    def too_long(table):
        begin, end = table["layers.1.bk"]["data_offsets"]
        table["layers.1.bk"]["data_offsets"] = [begin, end + 4]

    def not_numbers(table):
        table["layers.0.ak"]["data_offsets"] = ["0", "40"]

    for edit, message in ((same_bytes_other_shape, "shape"), (overlap, "gap or an overlap"),
                          (too_long, "hold"), (not_numbers, "two integers")):
        with pytest.raises(PageCorrupt, match=message):
            _read(path, **_rewrite(path, _with_table(data, edit)))


def test_a_well_formed_file_with_a_lying_header_length_is_caught(tmp_path):
    path, _, _ = _write(tmp_path)
    bad = struct.pack("<Q", 10**9) + path.read_bytes()[8:]
    with pytest.raises(PageCorrupt, match="header length"):
        _read(path, **_rewrite(path, bad))


def test_a_checksum_of_another_kind_is_not_trusted(tmp_path):
    import hashlib

    path, nbytes, _ = _write(tmp_path)
    with pytest.raises(PageCorrupt, match="another kind"):
        _read(path, nbytes, hashlib.sha256(path.read_bytes()).hexdigest())


def test_a_fifo_in_the_place_of_a_page_does_not_block(tmp_path):
    path, nbytes, checksum = _write(tmp_path)
    path.unlink()
    os.mkfifo(path)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            _read(path, nbytes, checksum)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)  # a blocked daemon thread cannot hang the test run
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO page blocked"
    assert isinstance(outcome[0], PageCorrupt) and "regular file" in str(outcome[0])


def test_a_symlink_in_the_place_of_a_page_is_not_followed(tmp_path):
    path, nbytes, checksum = _write(tmp_path)
    real = path.with_name("elsewhere.bin")
    path.rename(real)
    path.symlink_to(real)
    with pytest.raises(PageCorrupt, match="opened"):
        _read(path, nbytes, checksum)


def test_a_missing_page_is_a_file_not_found(tmp_path):
    path, nbytes, checksum = _write(tmp_path)
    path.unlink()
    with pytest.raises(FileNotFoundError):
        _read(path, nbytes, checksum)


def test_write_atomic_replaces_and_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "a" / "b.safetensors"
    blobs.write_atomic(path, [b"first"])
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        blobs.write_atomic(path, [b"second, ", b"never complete"])
    assert calls and path.read_bytes() == b"first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.safetensors"]
