"""What a web visitor may hand the server to ingest: uploads checked and saved, server paths kept inside the roots.

Both checks run before anything reaches `retrieval`: an upload that is missing, too large or of a type the
extractors do not read is refused with its reason (the others still go in); a path on the server is accepted only
inside one of the operator's ingest roots and never inside the data folder (the database, the caches and other
visitors' uploads live there), with one refusal whether or not the path exists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import AppError


class NotAllowedError(AppError):
    """A web visitor asked for something the operator did not allow (a server path, a model)."""


@dataclass
class AcceptedUploads:
    """What to ingest (each saved .zip, each other file's folder) and what was refused, each with its reason."""

    targets: list[Path] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)


def accept_uploads(uploads: Sequence[str | Path], collection_dir: Path, max_bytes: int) -> AcceptedUploads:
    """Copy the acceptable uploads into folders of their own under `collection_dir` (`app.uploads`)."""
    from app.uploads import store_upload
    from retrieval.extract import supported

    accepted = AcceptedUploads()
    for item in uploads:
        source = Path(item)
        name = source.name
        reason = None
        if not source.is_file():
            reason = "the upload is missing (expired or not a file)"
        elif source.stat().st_size > max_bytes:
            reason = f"too large: {source.stat().st_size / 1024**2:.1f} MiB, the limit is {max_bytes / 1024**2:.0f} MiB"
        elif not (supported(name) or name.lower().endswith(".zip")):
            reason = f"unsupported file type {Path(name).suffix or '(none)'}"
        if reason:
            accepted.rejected.append({"path": name, "reason": reason})
            continue
        with source.open("rb") as data:
            saved = store_upload(collection_dir, name, data)
        accepted.targets.append(saved if saved.suffix.lower() == ".zip" else saved.parent)
    return accepted


def check_server_path(given: str, roots: Sequence[Path], data_dir: Path) -> Path:
    """`given` resolved (links followed; relative to the first root) if it lies inside one of `roots` and outside
    `data_dir`; the same refusal otherwise, whether or not it exists, so a visitor learns nothing about the rest
    of the machine."""
    if not roots:
        raise NotAllowedError("this server takes uploads only: paths on the server are turned off (its "
                              "operator can allow folders with `tpa-rag serve --ingest-root DIR`)")
    try:
        raw = Path(given.strip())
        resolved = Path(os.path.realpath(raw if raw.is_absolute() else roots[0] / raw))
    except (ValueError, OSError):  # a NUL byte, a name too long
        resolved = None
    data = os.path.realpath(data_dir)
    for root in roots:
        if resolved is not None and resolved.is_relative_to(os.path.realpath(root)) \
                and not resolved.is_relative_to(data):
            return resolved
    raise NotAllowedError(f"{given!r} is not inside a folder this server may ingest "
                          f"({', '.join(str(r) for r in roots)})")
