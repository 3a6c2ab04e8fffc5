"""Opening a file under a root for reading: never through a symbolic link, never anything but a regular file,
never more bytes than a limit, and never a blocking open.

The path is opened one component at a time from a descriptor of the root with `O_NOFOLLOW` (where the platform
has `dir_fd`), so a folder swapped for a link to elsewhere after the listing cannot take the read outside the
root; `O_NONBLOCK` makes opening a FIFO return at once, and `fstat` on the open descriptor refuses it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _BINARY
_DIR_FLAGS = os.O_RDONLY | _NOFOLLOW | _DIRECTORY | _CLOEXEC


class SourceReadError(Exception):
    """A file that turned out unsafe or unreadable while being read (the message is the reason)."""


def inside(path: Path, root: Path) -> bool:
    """Whether `path` is `root` or below it (both already resolved)."""
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _link_reason(root: Path, rel: str) -> str:
    target = Path(os.path.realpath(root / rel))
    if not inside(target, root):
        return "symbolic link leaves the root"
    return "a symbolic link appeared on its path after it was listed"


def open_regular(root: Path, rel: str) -> int:
    """A read-only descriptor of the regular file `root/rel` ('/'-separated, no '..'), opened without following
    any link below `root`. Raises SourceReadError with the reason, OSError when the file cannot be opened."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise SourceReadError(f"not a path inside the root: {rel!r}")
    if os.open in os.supports_dir_fd and _NOFOLLOW:
        fd = _open_by_components(root, rel, parts)
    else:  # no dir_fd: resolve, check, and refuse a link in the last component
        if not inside(Path(os.path.realpath(root / rel)), root):
            raise SourceReadError("symbolic link leaves the root")
        fd = os.open(root / rel, _FILE_FLAGS)
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise SourceReadError("not a regular file")
    return fd


def _open_by_components(root: Path, rel: str, parts: list[str]) -> int:
    current = os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    try:
        for name in parts[:-1]:
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=current)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise SourceReadError(_link_reason(root, rel)) from exc
                raise
            os.close(current)
            current = nxt
        try:
            return os.open(parts[-1], _FILE_FLAGS, dir_fd=current)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SourceReadError(_link_reason(root, rel)) from exc
            raise
    finally:
        os.close(current)


def read_regular(root: Path, rel: str, limit: int) -> bytes:
    """The content of the regular file `root/rel`, refused when it holds more than `limit` bytes."""
    fd = open_regular(root, rel)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise SourceReadError(f"file too large (over {limit} bytes)")
    return data
