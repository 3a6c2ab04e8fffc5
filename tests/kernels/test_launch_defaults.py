"""The default launch parameters, pinned: every decode and prefill launch over a grid of shapes, dtypes and device
profiles must equal the launches recorded in launch_defaults.json.

The file holds one sha256 per (kernel, form, heads, ranks, head dim, dtype) group over that group's launches
(kernel, grid, launch options, scalar and constexpr arguments; `launch_capture`). It was recorded from the
launchers as they were before the launch parameters became `DecodeConfig` / `PrefillConfig` (leaving out the
constexprs of the modes only tests had set), so a pass means the production path launches exactly what it
launched then. A deliberate change of a default re-records it:
`python tests/kernels/test_launch_defaults.py --write` (and says why in the commit).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from launch_capture import decode_cases, prefill_cases, recorded_launches

pytest.importorskip("triton")

RECORD = Path(__file__).with_name("launch_defaults.json")


def record_launches() -> dict[str, dict[str, list[dict]]]:
    """group -> case id -> the launches the default path makes for that case (the kernels never run)."""
    from flashtpa import triton_decode, triton_prefill
    from flashtpa.inputs import AttentionInputs

    out: dict[str, dict[str, list[dict]]] = {}
    for cases, launcher in ((decode_cases(), triton_decode.decode_attention),
                            (prefill_cases(), triton_prefill.prefill_attention)):
        for group, case_id, args, profile in cases:
            with recorded_launches(profile) as launches:
                launcher(AttentionInputs(**args), args["bk"].shape[-1] ** -0.5)
            out.setdefault(group, {})[case_id] = launches
    return out


def digests(records: dict[str, dict[str, list[dict]]]) -> dict[str, str]:
    """group -> sha256 over the group's (case id, launches) pairs, in case order."""
    return {group: hashlib.sha256(json.dumps(list(cases.items()), sort_keys=True).encode()).hexdigest()
            for group, cases in records.items()}


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, list[dict]]]:
    return record_launches()


def test_default_launches_are_unchanged(records: dict) -> None:
    want = json.loads(RECORD.read_text())
    got = digests(records)
    assert got.keys() == want.keys(), "the case grid changed: re-record launch_defaults.json"
    changed = sorted(g for g in want if got[g] != want[g])
    example = next(iter(records[changed[0]].items())) if changed else None
    assert not changed, f"{len(changed)} groups launch differently: {changed}; the first case now: {example}"


def test_digest_sees_a_changed_launch(records: dict) -> None:
    group = next(iter(records))
    cases = dict(records[group])
    case_id = next(iter(cases))
    cases[case_id] = [dict(cases[case_id][0], num_warps=cases[case_id][0]["num_warps"] * 2)] + cases[case_id][1:]
    assert digests({group: cases})[group] != json.loads(RECORD.read_text())[group]


if __name__ == "__main__" and "--write" in sys.argv:
    RECORD.write_text(json.dumps(digests(record_launches()), indent=1, sort_keys=True) + "\n")
