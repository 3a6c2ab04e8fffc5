"""The Triton kernels under TRITON_INTERPRET=1 on the CPU (CI), against the float64 oracle, on awkward sizes.

The cases live in interpret_cases.py and run once, in a child process that alone sees TRITON_INTERPRET=1
(Triton reads it at import, so setting it here would leak into every later test); each case is then one test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from interpret_cases import all_cases

pytest.importorskip("triton")

_HERE = Path(__file__).parent
_ROOT = _HERE.parent.parent


@pytest.fixture(scope="module")
def interpreted_results() -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT), str(_ROOT / "kernels"), str(_HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(_HERE / "interpret_cases.py")], cwd=_ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"interpreted run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case_id", list(all_cases()))
def test_kernel_case(interpreted_results: dict, case_id: str) -> None:
    result = interpreted_results[case_id]
    assert result["ok"], f"{case_id}: {result['detail']}"


def test_interpreter_does_not_leak() -> None:
    assert os.environ.get("TRITON_INTERPRET") in (None, "", "0")
