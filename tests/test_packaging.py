"""The installed distribution as a user meets it: import names of its own, and a CLI that works from any folder.

A top-level package of ours that shares its import name with a package another distribution installs shadows it
(or is shadowed by it) depending on sys.path: transformers' `kernels` dependency once broke the suite that way.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTION = "tpa-rag"


def our_import_names() -> set[str]:
    """The top-level import names our distribution installs (from its metadata, as the installer recorded them)."""
    provided = importlib.metadata.packages_distributions()
    return {name for name, dists in provided.items() if DISTRIBUTION in dists and not name.startswith("_")}


def test_no_import_name_of_ours_is_provided_by_another_distribution():
    names = our_import_names()
    assert {"app", "tpa_core", "retrieval", "flashtpa"} <= names, f"unexpected import names: {sorted(names)}"
    provided = importlib.metadata.packages_distributions()
    clashes = {name: sorted(set(provided[name]) - {DISTRIBUTION}) for name in names
               if set(provided[name]) - {DISTRIBUTION}}
    assert not clashes, f"import names shared with other installed distributions: {clashes}"


def test_transformers_sentence_transformers_and_our_kernels_in_one_process_from_the_repo_root():
    """Started from the repository root (where a shadowing package would be found first): transformers' Llama
    modeling module imports, the packaged MiniLM loads and embeds, and one attention call runs through dispatch."""
    script = """
import torch
import transformers.models.llama.modeling_llama  # imports Hugging Face's `kernels`
from retrieval.embeddings import SentenceTransformerEmbedder
from flashtpa.dispatch import attention

vectors = SentenceTransformerEmbedder().embed(["a fresh clone must pass its tests"])
assert vectors.shape == (1, 384), vectors.shape
B, N, H, D, G = 1, 3, 4, 16, 2
g = torch.Generator().manual_seed(0)
out = attention(q=torch.randn(B, N, H, D, generator=g), ak=None, bk=torch.randn(B, N, G, D, generator=g),
                av=None, bv=torch.randn(B, N, G, D, generator=g), kv_lens=torch.tensor([N], dtype=torch.int32))
assert out.shape == (B, N, H, D) and torch.isfinite(out).all()
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def cli() -> str:
    path = Path(sysconfig.get_path("scripts")) / "tpa-rag"
    if not path.exists():
        pytest.skip(f"the tpa-rag console script is not installed beside this Python ({path})")
    return str(path)


def test_cli_runs_from_a_folder_outside_the_repository(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "tpa_core"))
    from engine_fixtures import write_tiny_gguf

    model = tmp_path / "tiny.gguf"
    write_tiny_gguf(model, qtype="Q8_0")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    helped = subprocess.run([cli(), "--help"], cwd=outside, env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "generate" in helped.stdout, helped.stderr[-2000:]
    done = subprocess.run([cli(), "--data-dir", str(tmp_path / "data"), "--model", str(model), "generate", "--raw",
                           "--json", "--max-new-tokens", "4", "the wall is"],
                          cwd=outside, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert 1 <= len(result["token_ids"]) <= 4
