"""The decode split grid's size: a function of the SM count, the batch and the capacity, never the length."""

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture
def h200_sms(monkeypatch):
    from flashtpa import triton_decode

    monkeypatch.setattr(triton_decode, "multiprocessors", lambda device: 132)
    return triton_decode.split_count


@pytest.mark.parametrize("programs_per_split, expected", [
    (1, 256),  # 264 slots: 256 is within 1/32, the merge then pads nothing
    (2, 128),
    (4, 64),
    (3, 88),  # 64 would leave a quarter of the round idle
    (5, 52),
    (16, 16),
])
def test_factor_grid_snaps_to_a_power_of_two_only_when_nearly_free(h200_sms, programs_per_split, expected) -> None:
    assert h200_sms(torch.device("cpu"), programs_per_split, 1 << 19, 64, waves=2, round_down=True) == expected


def test_gqa_grid_rounds_up_and_keeps_its_count(h200_sms) -> None:
    assert h200_sms(torch.device("cpu"), 1, 1 << 19, 64, waves=2) == 264
    assert h200_sms(torch.device("cpu"), 4, 1 << 19, 64, waves=2) == 66


def test_short_capacity_caps_the_slices(h200_sms) -> None:
    # 4,096 tokens in 64-token slices at most: 64 slices, a power of two already
    assert h200_sms(torch.device("cpu"), 1, 4096, 64, waves=2, round_down=True) == 64
    # 3,000 tokens: 47 slices, and 32 would drop a third of them
    assert h200_sms(torch.device("cpu"), 1, 3000, 64, waves=2, round_down=True) == 47
