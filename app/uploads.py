"""Uploaded files kept in the data folder, a folder per upload so that two uploads never overwrite each other.

A browser sends an upload's file name only (never its folder), so `a/README.md` and `b/README.md`, or the many
`__init__.py` of a folder upload, arrive with the same name. Each upload is stored as
`uploads/<collection>/<id>/<name>`, where `<id>` is the start of the SHA-256 of its bytes: different files keep
different folders (and documents, `<id>/README.md`), and uploading the same file again finds it already there.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO

UPLOAD_ID_CHARS = 10
MAX_NAME_CHARS = 200
_UNSAFE = re.compile(r"[^\w.\- ()+,@=\[\]]", re.UNICODE)


def safe_name(name: str) -> str:
    """The last component of `name`, with characters outside a conservative set replaced by `_`."""
    base = Path(name.replace("\\", "/")).name
    cleaned = _UNSAFE.sub("_", base).strip(" .")
    if len(cleaned) > MAX_NAME_CHARS:
        stem, dot, suffix = cleaned.rpartition(".")
        cleaned = (stem[:MAX_NAME_CHARS - len(suffix) - 1] + dot + suffix) if dot and len(suffix) < 16 \
            else cleaned[:MAX_NAME_CHARS]
    return cleaned or "upload"


def store_upload(folder: Path, name: str, data: BinaryIO) -> Path:
    """Copy `data` to `folder/<id>/<safe name>` (written to a temporary file, then renamed); returns that path."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".upload.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            while block := data.read(1 << 20):
                digest.update(block)
                out.write(block)
        target_dir = folder / digest.hexdigest()[:UPLOAD_ID_CHARS]
        target_dir.mkdir(exist_ok=True)
        target = target_dir / safe_name(name)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
