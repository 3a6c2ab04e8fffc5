"""benchmarks/kernel_resources.py builds a kernel for an sm_90 target on the CPU and reads its resource usage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_gqa_decode_builds_for_sm90_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--only", "gqa"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(row for row in proc.stdout.splitlines() if row.startswith("decode gqa"))
    count = lambda pattern: int(re.search(pattern, line).group(1))  # noqa: E731
    assert 0 < count(r"regs\s+(\d+)") <= 255, line
    assert count(r"stack\s+(\d+) B") == 0, line
    assert count(r" HGMMA=(\d+)") + count(r" HMMA=(\d+)") > 0, line  # the products run on tensor cores
