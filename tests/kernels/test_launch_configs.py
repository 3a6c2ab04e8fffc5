"""A launch config that does not fit its inputs or device is refused with a message, before anything launches."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from launch_capture import meta_inputs

from flashtpa.inputs import AttentionInputs

pytest.importorskip("triton")


def _decode(form: str, H: int, ranks: tuple[int, int, int], device: str = "meta") -> AttentionInputs:
    args = meta_inputs(form, 2, 1, H, 64, 4096, ranks, torch.bfloat16)
    if device != "meta":
        args = {k: None if v is None else torch.zeros(v.shape, dtype=v.dtype, device=device) for k, v in args.items()}
    return AttentionInputs(**args)


@pytest.mark.parametrize("form, H, ranks, fields, message", [
    ("contextual", 34, (6, 2, 2), dict(prefetch=True), "rank-1 head factors only"),
    ("contextual", 32, (16, 1, 1), dict(head_tile=24), "power of two >= 16"),
    ("fixed", 32, (0, 8, 8), dict(head_tile=32), "group's heads padded"),
    ("contextual", 32, (16, 1, 1), dict(num_splits=0), "must be positive"),
    ("contextual", 32, (16, 1, 1), dict(pdl=True), "pdl=True needs a Hopper"),
])
def test_decode_refuses_a_config_that_does_not_fit(form, H, ranks, fields, message) -> None:
    from flashtpa.triton_decode import decode_attention, default_decode_config

    x = _decode(form, H, ranks)
    with pytest.raises(ValueError, match=message):
        decode_attention(x, 0.125, dataclasses.replace(default_decode_config(x), **fields))


def test_tma_needs_aligned_views(monkeypatch) -> None:
    from flashtpa import _launch
    from flashtpa.triton_decode import decode_attention, default_decode_config

    monkeypatch.setattr(_launch, "tma_supported", lambda device: True)  # a Hopper, as far as the defaults can tell
    x = _decode("fixed", 32, (0, 8, 8), device="cpu")
    assert default_decode_config(x).tma is True
    storage = torch.zeros(x.bk.numel() + 1, dtype=x.bk.dtype)
    unaligned = dataclasses.replace(x, bk=storage[1:].view(x.bk.shape))  # base 2 bytes off a 16-byte boundary
    assert default_decode_config(unaligned).tma is False  # the default never picks what cannot run
    with pytest.raises(ValueError, match="16-byte aligned"):
        decode_attention(unaligned, 0.125, dataclasses.replace(default_decode_config(unaligned), tma=True))


def test_prefill_refuses_more_query_tiles_than_a_launch_holds() -> None:
    from flashtpa.triton_prefill import default_prefill_config, prefill_attention

    N = 16 * 65535 + 1
    x = AttentionInputs(**meta_inputs("fixed", 1, N, 2, 64, N, (0, 1, 1), torch.bfloat16))
    with pytest.raises(ValueError, match="at most 65535"):
        prefill_attention(x, 0.125, dataclasses.replace(default_prefill_config(x), block_n=16))
