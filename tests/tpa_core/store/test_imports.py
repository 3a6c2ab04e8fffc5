"""The store's modules import in any order and use each other only through public names."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
STORE = ROOT / "tpa_core" / "store"
MODULES = sorted(p.stem for p in STORE.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("first", ["maintenance", "reconcile", "blobs", "records", "eviction"])
def test_a_helper_module_imports_first_in_a_fresh_process(first):
    code = (f"import tpa_core.store.{first}\nimport tpa_core.store\n"
            "from tpa_core.store import FactorStore, PageRef\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")])})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _imported(tree: ast.Module) -> set[str]:
    """Every module named by an import statement of the tree, TYPE_CHECKING blocks included."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("module", [m for m in MODULES if m != "store"])
def test_no_helper_module_imports_the_store(module):
    tree = ast.parse((STORE / f"{module}.py").read_text())
    assert "tpa_core.store.store" not in _imported(tree), f"{module}.py imports tpa_core.store.store"


@pytest.mark.parametrize("module", MODULES)
def test_no_private_name_of_another_object_is_used(module):
    """`x._name` only on `self`/`cls`: a module never reaches into another's private state."""
    tree = ast.parse((STORE / f"{module}.py").read_text())
    bad = [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
           if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
           and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]
    assert not bad, f"{module}.py uses private names of other objects: {bad}"
