"""Training data that ships offline: the CPython standard library's source, tokenized at byte level.

The corpus is the `.py` files of the running interpreter's standard library (code, docstrings and, in
`pydoc_data/topics.py`, the language reference's text), without test suites, `site-packages` and caches: a
package every machine with Python has, at a version we record. One file is one document.

Tokens are bytes: id b < 256 is the byte b of the UTF-8 file, and three special tokens follow
(`<|endoftext|>` 256 between documents, `<|im_start|>` 257 and `<|im_end|>` 258 for chat prompts). Why bytes
and not the default model's 49,152-token BPE: at the sizes trained here a 49k-row embedding would hold most of
the parameters and see each row a handful of times, the attention comparison would be drowned by it; bits per
byte are exact (one byte per token), and the prepared file needs no tokenizer on the training machine.

`prepare(out)` writes one compressed `.npz`: the train and held-out documents (split by document, by a hash of
the file's path, so the split does not depend on which other files exist), their offsets, and a manifest
(source, Python version, file count, sha256 of the content). `TokenData.load(path)` reads it back with
`allow_pickle=False`; batches are a pure function of (seed, step), so every variant of a comparison sees the same
data in the same order and a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tpa_core.errors import TPAError

logger = logging.getLogger(__name__)

DATA_FORMAT = "tpa-rag-train-bytes/1"
BYTE_VOCAB = 256
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOT = BYTE_VOCAB  # <|endoftext|>: the separator after every document
VOCAB_SIZE = BYTE_VOCAB + len(SPECIAL_TOKENS)
HELDOUT_PER_MILLE = 50  # about 5% of the documents
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
MAX_FILE_BYTES = 4 << 20  # a larger .py is generated data, not text to learn from
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ----- the tokenizer ---------------------------------------------------------------------------------------
def encode(text: str) -> list[int]:
    """Token ids of `text`: its UTF-8 bytes (what `byte_tokenizer().encode` returns, without the library)."""
    return list(text.encode("utf-8"))


def byte_tokenizer():
    """The byte-level `tpa_core.tokenizer.Tokenizer` of the trained models: id = byte value, the special tokens
    after the bytes, ChatML chat template, `<|im_end|>` and `<|endoftext|>` as end of sequence."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from tpa_core.tokenizer import Tokenizer, bytes_to_unicode

    spelling = bytes_to_unicode()  # byte -> the printable character byte-level BPE vocabularies use
    vocab = {spelling[b]: b for b in range(BYTE_VOCAB)}
    backend = Backend(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(BYTE_VOCAB, VOCAB_SIZE)):  # the data file's ids depend on it
        raise TPAError(f"byte tokenizer: special tokens got ids {ids}, expected {BYTE_VOCAB}..{VOCAB_SIZE - 1}")
    return Tokenizer(backend=backend, bos_token=None, eos_token="<|im_end|>",
                     eos_token_ids=[backend.token_to_id("<|im_end|>"), EOT], chat_template=CHATML)


# ----- preparing the corpus --------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def corpus_files(root: Path) -> list[Path]:
    """The corpus documents under `root`: `.py` files, sorted by relative path, outside `EXCLUDED_DIRS`."""
    root = root.resolve()
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(relative.parts[:-1]) or not path.is_file() or path.is_symlink():
            continue
        if not path.resolve().is_relative_to(root):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(relative_path: str) -> bool:
    """Whether a document belongs to the held-out split: a hash of its path, stable across versions."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") % 1000 < HELDOUT_PER_MILLE


def prepare(out: str | Path, source: str | Path | None = None, max_bytes: int | None = None) -> dict[str, Any]:
    """Tokenize the corpus under `source` (default: this Python's standard library) into `out` (.npz).

    `max_bytes` caps the train split (documents in path order until the cap) for small runs. Returns the
    manifest that is stored in the file.
    """
    root = Path(source).resolve() if source is not None else stdlib_dir()
    if not root.is_dir():
        raise TPAError(f"corpus folder not found: {root}")
    splits: dict[str, list[bytes]] = {"train": [], "heldout": []}
    digest = hashlib.sha256()
    kept, skipped = [], 0
    for path in corpus_files(root):
        relative = path.relative_to(root).as_posix()
        data = path.read_bytes()
        if not data or len(data) > MAX_FILE_BYTES:
            skipped += 1
            continue
        split = "heldout" if is_heldout(relative) else "train"
        if split == "train" and max_bytes is not None and sum(map(len, splits["train"])) + len(data) > max_bytes:
            continue
        splits[split].append(data)
        kept.append(relative)
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(data)
    if not splits["train"] or not splits["heldout"]:
        raise TPAError(f"{root} gave {len(splits['train'])} train and {len(splits['heldout'])} held-out documents; "
                       f"both splits need at least one .py file")
    arrays: dict[str, np.ndarray] = {}
    for split, docs in splits.items():
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(docs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(d) for d in docs], dtype=np.int64)
    manifest = {
        "format": DATA_FORMAT,
        "source": "CPython standard library (.py files)" if source is None else "folder of .py files",
        "source_dir": str(root),
        "python": sys.version.split()[0] if source is None else None,
        "implementation": platform.python_implementation() if source is None else None,
        "files": len(kept), "skipped_files": skipped,
        "train_documents": len(splits["train"]), "heldout_documents": len(splits["heldout"]),
        "train_bytes": int(arrays["train_bytes"].size), "heldout_bytes": int(arrays["heldout_bytes"].size),
        "content_sha256": digest.hexdigest(),
        "split": f"held out: sha256(relative path) mod 1000 < {HELDOUT_PER_MILLE}",
        "tokenizer": f"bytes: id = UTF-8 byte value; {', '.join(SPECIAL_TOKENS)} = {BYTE_VOCAB}..{VOCAB_SIZE - 1}",
        "max_bytes": max_bytes,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, manifest=np.array(json.dumps(manifest, sort_keys=True)), **arrays)
    tmp.replace(out)
    logger.info("wrote %s: %d train / %d held-out documents, %d / %d bytes", out, manifest["train_documents"],
                manifest["heldout_documents"], manifest["train_bytes"], manifest["heldout_bytes"])
    return manifest


# ----- reading it back ---------------------------------------------------------------------------------------
def _stream(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Documents `data[offsets[i]:offsets[i+1]]` as one uint16 token stream, `EOT` after each."""
    n_docs = offsets.size - 1
    out = np.empty(data.size + n_docs, dtype=np.uint16)
    ends = offsets[1:] + np.arange(1, n_docs + 1)  # position just past each document's EOT
    is_eot = np.zeros(out.size, dtype=bool)
    is_eot[ends - 1] = True
    out[is_eot] = EOT
    out[~is_eot] = data
    return out


@dataclass
class TokenData:
    """Train and held-out token streams (uint16, documents separated by `EOT`) and the file's manifest."""

    train: np.ndarray
    heldout: np.ndarray
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> TokenData:
        """Read a file written by `prepare`; a missing, foreign or damaged file is a TPAError."""
        path = Path(path)
        if not path.is_file():
            raise TPAError(f"training data not found: {path} (write it with `--prepare-data {path}`)")
        try:
            with np.load(path, allow_pickle=False) as f:
                manifest = json.loads(str(f["manifest"]))
                arrays = {name: f[name] for name in ("train_bytes", "train_offsets", "heldout_bytes",
                                                     "heldout_offsets")}
        except (OSError, ValueError, KeyError) as exc:
            raise TPAError(f"{path} is not a training data file ({exc})") from None
        if manifest.get("format") != DATA_FORMAT:
            raise TPAError(f"{path} has format {manifest.get('format')!r}, expected {DATA_FORMAT!r}")
        for split in ("train", "heldout"):
            data, offsets = arrays[f"{split}_bytes"], arrays[f"{split}_offsets"]
            if (data.dtype != np.uint8 or offsets.dtype != np.int64 or offsets.ndim != 1 or offsets.size < 2
                    or offsets[0] != 0 or offsets[-1] != data.size or np.any(np.diff(offsets) < 0)):
                raise TPAError(f"{path}: the {split} split is damaged (offsets do not describe its bytes)")
        return cls(train=_stream(arrays["train_bytes"], arrays["train_offsets"]),
                   heldout=_stream(arrays["heldout_bytes"], arrays["heldout_offsets"]), manifest=manifest)

    @classmethod
    def from_texts(cls, train: list[str], heldout: list[str]) -> TokenData:
        """From in-memory documents (tests and small experiments)."""
        def split(docs: list[str]) -> np.ndarray:
            blobs = [d.encode("utf-8") for d in docs]
            offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
            return _stream(np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets)

        return cls(train=split(train), heldout=split(heldout), manifest={"format": DATA_FORMAT, "source": "texts"})

    def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets `[batch_size, seq_len]` (int64) for `step`: random windows of the train stream,
        a pure function of (seed, step)."""
        span = self.train.size - seq_len - 1
        if span < 1:
            raise TPAError(f"the train split has {self.train.size} tokens, too few for windows of {seq_len + 1}")
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, span, size=batch_size)  # [B]
        windows = self.train[starts[:, None] + np.arange(seq_len + 1)]  # [B, seq_len + 1]
        tokens = torch.from_numpy(windows.astype(np.int64))
        return tokens[:, :-1], tokens[:, 1:]

    def heldout_windows(self, count: int, seq_len: int) -> tuple[Tensor, Tensor]:
        """Up to `count` non-overlapping windows of the held-out stream, spread evenly over it (the same every
        call): inputs and targets `[n, seq_len]`."""
        available = (self.heldout.size - 1) // seq_len
        if available < 1:
            raise TPAError(f"the held-out split has {self.heldout.size} tokens, too few for a window of {seq_len}")
        n = min(count, available)
        picks = np.linspace(0, available - 1, n).round().astype(np.int64) * seq_len  # [n] window starts
        windows = self.heldout[picks[:, None] + np.arange(seq_len + 1)]  # [n, seq_len + 1]
        tokens = torch.from_numpy(windows.astype(np.int64))
        return tokens[:, :-1], tokens[:, 1:]


def main(argv: list[str] | None = None) -> int:
    """`python -m tpa_core.training.data OUT.npz [--source DIR] [--max-bytes N]`: prepare the corpus."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", help="the .npz file to write")
    parser.add_argument("--source", default=None, help="folder of .py files (default: this Python's stdlib)")
    parser.add_argument("--max-bytes", type=int, default=None, help="cap on the train split's bytes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = prepare(args.out, args.source, args.max_bytes)
    except TPAError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(json.dumps(manifest, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
