"""The byte-level training corpus: which files it takes, the split by document, determinism, the file format and
its checks, the batches, and the tokenizer the trained models ship with."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tpa_core.errors import TPAError
from tpa_core.training.data import (
    EOT,
    VOCAB_SIZE,
    TokenData,
    byte_tokenizer,
    corpus_files,
    encode,
    is_heldout,
    prepare,
)


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "lib"
    files = {
        "a.py": "import os\n", "pkg/__init__.py": "", "pkg/b.py": "def b():\n    return 'ü'\n",
        "test/test_a.py": "assert True\n", "pkg/tests/t.py": "x = 1\n", "site-packages/dep.py": "y = 2\n",
        "pkg/__pycache__/b.py": "z = 3\n", "notes.txt": "not python\n",
    }
    files.update({f"mod{i:02d}.py": f"value_{i} = {i}\n" * (i + 1) for i in range(40)})
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_corpus_takes_python_files_outside_tests_and_packages(source):
    names = [p.relative_to(source).as_posix() for p in corpus_files(source)]
    assert names == sorted(names) and "a.py" in names and "pkg/b.py" in names and "pkg/__init__.py" in names
    assert not any(n.startswith(("test/", "site-packages/")) or "/tests/" in n or "__pycache__" in n
                   for n in names)
    assert "notes.txt" not in names


def test_prepare_splits_by_document_and_is_deterministic(source, tmp_path):
    first = prepare(tmp_path / "one.npz", source)
    second = prepare(tmp_path / "two.npz", source)
    assert first == second and first["skipped_files"] == 1  # the empty __init__.py
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    data = TokenData.load(tmp_path / "one.npz")
    heldout_files = [p for p in corpus_files(source) if is_heldout(p.relative_to(source).as_posix())
                     and p.stat().st_size]
    assert first["heldout_documents"] == len(heldout_files) >= 1
    assert first["train_documents"] + first["heldout_documents"] == first["files"]
    # every document sits whole in one split, followed by EOT
    heldout_text = b"".join(p.read_bytes() + b"\0" for p in heldout_files)
    assert bytes(np.where(data.heldout == EOT, 0, data.heldout).astype(np.uint8)) == heldout_text
    assert int((data.train == EOT).sum()) == first["train_documents"]
    assert json.loads(json.dumps(data.manifest)) == first


def test_a_damaged_or_foreign_file_is_refused(source, tmp_path):
    with pytest.raises(TPAError, match="not found"):
        TokenData.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(TPAError, match="not a training data file"):
        TokenData.load(tmp_path / "junk.npz")
    prepare(tmp_path / "ok.npz", source)
    with np.load(tmp_path / "ok.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["train_offsets"] = arrays["train_offsets"] + 1
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(TPAError, match="damaged"):
        TokenData.load(tmp_path / "bad.npz")
    with pytest.raises(TPAError, match="corpus folder not found"):
        prepare(tmp_path / "x.npz", tmp_path / "nowhere")


def test_heldout_windows_are_fixed_and_batches_stay_in_range():
    data = TokenData.from_texts(["abc" * 50, "xyz" * 50], ["held out text " * 20])
    a, b = data.heldout_windows(5, 16), data.heldout_windows(5, 16)
    assert a[0].shape == (5, 16) and all(x.equal(y) for x, y in zip(a, b))
    inputs, targets = data.train_batch(seed=0, step=0, batch_size=8, seq_len=16)
    assert inputs.shape == targets.shape == (8, 16) and int(inputs.max()) < VOCAB_SIZE
    with pytest.raises(TPAError, match="too few"):
        data.train_batch(seed=0, step=0, batch_size=1, seq_len=10_000)


def test_byte_tokenizer_is_the_identity_on_bytes():
    tok = byte_tokenizer()
    text = "def f(x):\n    return 'naïve ✓'  # <not special>\n"
    assert tok.encode(text) == encode(text) == list(text.encode("utf-8"))
    assert tok.decode(encode(text)) == text
    assert tok.vocab_size == VOCAB_SIZE
    chat = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert chat[0] == tok.token_to_id("<|im_start|>") == 257 and 258 in chat
    assert tok.eos_token_ids == [258, EOT]
