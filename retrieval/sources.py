"""What to ingest: the files behind a path (a file, a folder, a git work tree or a .zip), and what was skipped.

Nothing here writes anywhere: folders are walked in place, archives are read entry by entry from the open zip
(never extracted), and every file is read through `retrieval.safe_open` (no link followed below the root, regular
files only, never a blocking open, bounded size). Each skipped file or folder comes with the reason, one entry per
skipped folder (its content is not listed).

Safety rules:
- every entry must resolve inside its root (the given folder or work tree; for a given file or archive, its
  folder), parents included; a symbolic link is followed only to a target inside the root that the name rules
  would not skip (a link `alias.txt -> .env` counts as a hidden file).
- a name that is not valid UTF-8 is skipped with the reason, shown with `\\xNN` escapes.
- folders: hidden and vendored/build folders are skipped; .gitignore files are honoured (`retrieval.gitignore`),
  and a folder whose .gitignore cannot be read or applied is skipped whole; non-regular files (fifos, devices)
  are skipped.
- git work trees: only tracked files (`git ls-files`, with fsmonitor hooks disabled); untracked and ignored files
  are reported; submodules are not followed. A folder inside a work tree where git tracks nothing (say, one the
  repository ignores) is walked as a plain folder.
- zip archives: entries with absolute paths, drive letters or `..` are refused (path traversal), as are symlink
  and encrypted entries; an entry over the file size limit, with a compression ratio over the limit (zip bomb),
  or that inflates past its declared size is refused; the archive's total inflated size is capped, absolutely
  and relative to the archive's own size.
- any file over the size limit is skipped before it is read; the files of one listing are capped. A listing cut
  short by a limit is not `complete`, and the ingestion then keeps the stored documents it did not list.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from retrieval.errors import SourceNotFoundError
from retrieval.extract import extension, supported
from retrieval.gitignore import GitIgnore, GitIgnoreError
from retrieval.safe_open import SourceReadError, inside, open_regular, read_regular

__all__ = ["IngestLimits", "Listing", "Skipped", "SourceFile", "SourceReadError", "list_source", "printable"]

log = logging.getLogger(__name__)

VENDORED_DIRS = frozenset({
    "node_modules", "bower_components", "vendor", "third_party", "thirdparty", "venv", "env", ".venv",
    "site-packages", "dist-packages", "__pycache__", "dist", "build", "target", "out", "_build", "bin", "obj",
    "coverage", "htmlcov", ".tox", ".nox", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".gradle", ".idea",
    "eggs", ".eggs", "wheelhouse", "Pods", "DerivedData", ".next", ".nuxt", ".cache",
})
_EGG_INFO = re.compile(r".*\.egg-info$")
MAX_GITIGNORE_BYTES = 64 * 1024
NOT_UTF8 = "name is not valid UTF-8 (shown escaped)"


@dataclass(frozen=True)
class IngestLimits:
    """Safety limits of one ingestion.

    `max_files` documents and `max_chunks` newly embedded chunks per ingestion (all its paths together). An archive
    holds at most `max_archive_entries` entries and inflates to at most `max_archive_bytes`, and to at most
    `max_archive_ratio` times its own size (never less than `max_file_bytes`); one entry over
    `ratio_check_min_bytes` may not inflate more than `max_compression_ratio` times its compressed size."""

    max_file_bytes: int = 16 * 1024**2
    max_files: int = 100_000
    max_archive_entries: int = 100_000
    max_archive_bytes: int = 1024**3  # total inflated size of one archive
    max_compression_ratio: float = 100.0
    ratio_check_min_bytes: int = 64 * 1024  # small entries may compress well without being a threat
    max_archive_ratio: float = 20.0  # deflated text rarely shrinks past 1/10; far more is a bomb spread thin
    max_chunks: int = 100_000

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_files", "max_archive_entries", "max_archive_bytes",
                     "max_compression_ratio", "max_archive_ratio", "max_chunks"):
            if not getattr(self, name) > 0:
                raise ValueError(f"IngestLimits.{name} must be positive, got {getattr(self, name)!r}")


@dataclass
class Skipped:
    """A file or folder not ingested; `path` is shown to the user (a folder ends with '/')."""

    path: str
    reason: str


@dataclass
class SourceFile:
    """One file to ingest. `origin` + `relpath` identify it across ingestions; `path` is what users see."""

    origin: str  # absolute path of what was given: the folder, repository, archive or the file itself
    relpath: str  # '/'-separated path inside the origin (the file name for a single file)
    path: str  # display path: the origin's name, then relpath
    size: int
    mtime_ns: int
    source_type: str  # file | folder | git | zip
    read: Callable[[], bytes]  # the content; raises OSError or SourceReadError


@dataclass
class Listing:
    """The files found under one given path. `complete` origins may drop documents that are gone; a listing cut
    short by a limit is not complete."""

    origin: str
    source_type: str
    files: list[SourceFile] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    close: Callable[[], None] = lambda: None
    complete: bool = True

    def cut(self, display: str, reason: str) -> None:
        """Skip `display` because a limit was reached: the listing is no longer complete."""
        self.skipped.append(Skipped(display, reason))
        self.complete = False


def printable(path: str) -> str:
    """`path` for people and the database: bytes that are not UTF-8 (which the file system decoder keeps as
    lone surrogates) are shown as `\\xNN` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace") if not_utf8(path) else path


def not_utf8(name: str) -> bool:
    """Whether a name from the file system holds bytes that are not UTF-8."""
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def list_source(path: str | Path, limits: IngestLimits = IngestLimits()) -> Listing:
    """List what to ingest under `path` (a file, a folder, a git work tree or a .zip archive)."""
    given = Path(path).expanduser()
    if not os.path.lexists(given):
        raise SourceNotFoundError(printable(str(path)))
    root = given.resolve()
    if not root.exists():
        raise SourceNotFoundError(f"{printable(str(path))} (a broken symbolic link)")
    if not_utf8(str(root)):
        listing = Listing(origin=printable(str(root)), source_type="file")
        listing.skipped.append(Skipped(printable(root.name or str(root)), f"path {NOT_UTF8}"))
        return listing
    if root.is_dir():
        top = _git_toplevel(root)
        if top is not None:
            listing = _list_git(root, limits)
            if listing is not None:
                return listing
        return _list_folder(root, limits)
    if extension(root.name) == "zip":
        return _list_zip(root, limits)
    listing = Listing(origin=str(root), source_type="file")
    entry = _file_entry(root.parent, root.name, str(root), root.name, root.name, "file", limits)
    (listing.skipped if isinstance(entry, Skipped) else listing.files).append(entry)
    return listing


# -- files on disk -----------------------------------------------------------------------------------------------

def _reader(root: Path, rel: str, limit: int) -> Callable[[], bytes]:
    def read() -> bytes:
        return read_regular(root, rel, limit)

    return read


def _file_entry(root: Path, read_rel: str, origin: str, relpath: str, display: str, source_type: str,
                limits: IngestLimits) -> SourceFile | Skipped:
    """A SourceFile for the file `root/read_rel` (a path without links) after the type and size checks, or the
    reason it is skipped. The type comes from `relpath` (for a symlink, the link's name)."""
    if not supported(relpath):
        ext = extension(relpath)
        what = "archive inside a folder is not expanded; ingest it on its own" if ext == "zip" else (
            f"unsupported file type '.{ext}'" if ext else "unsupported file type (no extension)")
        return Skipped(display, what)
    try:
        st = os.lstat(root / read_rel)
    except OSError as exc:
        return Skipped(display, f"unreadable ({exc.strerror or exc})")
    if not stat.S_ISREG(st.st_mode):
        return Skipped(display, "not a regular file")
    if st.st_size == 0:
        return Skipped(display, "empty file")
    if st.st_size > limits.max_file_bytes:
        return Skipped(display, f"file too large ({st.st_size} bytes, limit {limits.max_file_bytes})")
    return SourceFile(origin=origin, relpath=relpath, path=display, size=st.st_size, mtime_ns=st.st_mtime_ns,
                      source_type=source_type, read=_reader(root, read_rel, limits.max_file_bytes))


def _dir_skip_reason(name: str) -> str | None:
    if name.startswith("."):
        return "hidden folder"
    if name in VENDORED_DIRS or _EGG_INFO.match(name):
        return "vendored, environment or build folder"
    return None


def _resolve_in_root(path: Path, root: Path, name_rules: bool = True) -> tuple[str | None, str | None]:
    """('/'-path inside the root of what `path` resolves to, None), or (None, the reason to skip `path`).

    Links anywhere on the path count, the parents' too; with `name_rules`, a link's target must pass the hidden
    and vendored rules itself."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None, "broken symbolic link" if path.is_symlink() else "unreadable (vanished, or a link loop)"
    if not inside(target, root):
        return None, "symbolic link leaves the root"
    rel = target.relative_to(root).as_posix()
    if name_rules and target != path:
        parts = rel.split("/")
        for name in parts[:-1]:
            reason = _dir_skip_reason(name)
            if reason is not None:
                return None, f"symbolic link into a {reason}"
        if parts[-1].startswith("."):
            return None, "symbolic link to a hidden file"
    return rel, None


def _disk_entry(path: Path, root: Path, rel: str, display: str, source_type: str,
                limits: IngestLimits) -> SourceFile | Skipped:
    """A file found by the folder walk, which never enters a linked folder: only a link itself needs resolving
    (a folder swapped for a link later is caught when the file is read)."""
    if not path.is_symlink():
        return _file_entry(root, rel, str(root), rel, display, source_type, limits)
    target_rel, reason = _resolve_in_root(path, root)
    if target_rel is None:
        return Skipped(display, reason or "symbolic link")
    return _file_entry(root, target_rel, str(root), rel, display, source_type, limits)


def _display(root: Path, path: Path) -> str:
    rel = path.relative_to(root).as_posix()
    name = root.name or root.as_posix()
    return printable(name if rel == "." else f"{name}/{rel}")


# -- folders -----------------------------------------------------------------------------------------------------

def _apply_gitignore(root: Path, folder: Path, ignore: GitIgnore, rel_folder: str) -> str | None:
    """Add the rules of `folder/.gitignore`; the reason it cannot be read or applied, if so."""
    target_rel, reason = _resolve_in_root(folder / ".gitignore", root, name_rules=False)
    try:
        if target_rel is None:
            raise SourceReadError(reason or "symbolic link")
        data = read_regular(root, target_rel, MAX_GITIGNORE_BYTES)
        ignore.add(rel_folder, data.decode("utf-8", errors="replace"))
    except (SourceReadError, GitIgnoreError) as exc:
        return str(exc)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _list_folder(root: Path, limits: IngestLimits) -> Listing:
    listing = Listing(origin=str(root), source_type="folder")
    ignore = GitIgnore()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False,
                                                onerror=lambda e: listing.skipped.append(
                                                    Skipped(_display(root, Path(e.filename)) + "/",
                                                            f"unreadable folder ({e.strerror})"))):
        folder = Path(dirpath)
        rel_folder = folder.relative_to(root).as_posix()
        rel_folder = "" if rel_folder == "." else rel_folder
        if ".gitignore" in filenames:
            reason = _apply_gitignore(root, folder, ignore, rel_folder)
            if reason is not None:  # walking on would index what the rules exclude
                listing.skipped.append(Skipped(_display(root, folder) + "/",
                                               f".gitignore not usable ({reason}); folder not walked"))
                dirnames[:] = []
                continue
        kept = []
        for name in sorted(dirnames):
            sub = folder / name
            rel = f"{rel_folder}/{name}" if rel_folder else name
            reason = NOT_UTF8 if not_utf8(name) else _dir_skip_reason(name)
            if reason is None and ignore.ignored(rel, is_dir=True):
                reason = "ignored by .gitignore"
            if reason is None and sub.is_symlink():
                _, reason = _resolve_in_root(sub, root)
                reason = reason or "symbolic link to a folder inside the root (not followed)"
            if reason is None:
                kept.append(name)
            else:
                listing.skipped.append(Skipped(_display(root, sub) + "/", reason))
        dirnames[:] = kept
        for name in sorted(filenames):
            path = folder / name
            rel = f"{rel_folder}/{name}" if rel_folder else name
            display = _display(root, path)
            if not_utf8(name):
                listing.skipped.append(Skipped(display, NOT_UTF8))
                continue
            if name.startswith("."):
                listing.skipped.append(Skipped(display, "hidden file"))
                continue
            if ignore.ignored(rel, is_dir=False):
                listing.skipped.append(Skipped(display, "ignored by .gitignore"))
                continue
            if len(listing.files) >= limits.max_files:
                listing.cut(display, f"file limit reached ({limits.max_files} files)")
                continue
            entry = _disk_entry(path, root, rel, display, "folder", limits)
            (listing.skipped if isinstance(entry, Skipped) else listing.files).append(entry)
    return listing


# -- git work trees ----------------------------------------------------------------------------------------------

_GIT = ("git", "-c", "core.fsmonitor=false", "-c", "core.quotepath=off")


def _git(root: Path, *args: str) -> bytes | None:
    try:
        done = subprocess.run([*_GIT, "-C", str(root), *args], capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("git %s in %s failed: %s", args[0], root, exc)
        return None
    if done.returncode != 0:
        log.info("git %s in %s: %s", args[0], root, done.stderr.decode(errors="replace").strip())
        return None
    return done.stdout


def _git_toplevel(root: Path) -> Path | None:
    out = _git(root, "rev-parse", "--show-toplevel")
    if not out:
        return None
    return Path(os.fsdecode(out.strip()))


def _z_paths(out: bytes) -> list[str]:
    return [os.fsdecode(p) for p in out.split(b"\0") if p]


def _list_git(root: Path, limits: IngestLimits) -> Listing | None:
    """Tracked files under `root`; None when git fails or tracks nothing here (a folder that the enclosing
    repository ignores): the caller walks the folder instead."""
    tracked = _git(root, "ls-files", "-z", "--cached")
    if not tracked:
        return None
    listing = Listing(origin=str(root), source_type="git")
    skipped_dirs: set[str] = set()
    tracked_paths = set(_z_paths(tracked))
    for rel in sorted(tracked_paths):
        parts = PurePosixPath(rel).parts
        reason = None
        for depth, name in enumerate(parts[:-1]):
            reason = NOT_UTF8 if not_utf8(name) else _dir_skip_reason(name)
            if reason is not None:
                folder = "/".join(parts[:depth + 1])
                if folder not in skipped_dirs:
                    skipped_dirs.add(folder)
                    listing.skipped.append(Skipped(_display(root, root / folder) + "/", reason))
                break
        if reason is not None:
            continue
        path = root / rel
        display = _display(root, path)
        if not_utf8(parts[-1]):
            listing.skipped.append(Skipped(display, NOT_UTF8))
            continue
        if parts[-1].startswith("."):
            listing.skipped.append(Skipped(display, "hidden file"))
            continue
        if not os.path.lexists(path):
            listing.skipped.append(Skipped(display, "tracked by git but missing from the work tree"))
            continue
        if path.is_dir() and not path.is_symlink():
            listing.skipped.append(Skipped(display + "/", "git submodule (not followed)"))
            continue
        if len(listing.files) >= limits.max_files:
            listing.cut(display, f"file limit reached ({limits.max_files} files)")
            continue
        target_rel, reason = _resolve_in_root(path, root)
        if target_rel is not None and target_rel != rel and target_rel not in tracked_paths:
            target_rel, reason = None, "symbolic link to a file git does not track"
        if target_rel is None:
            listing.skipped.append(Skipped(display, reason or "symbolic link"))
            continue
        entry = _file_entry(root, target_rel, str(root), rel, display, "git", limits)
        (listing.skipped if isinstance(entry, Skipped) else listing.files).append(entry)
    untracked = _git(root, "ls-files", "-z", "--others", "--exclude-standard", "--directory")
    for rel in _z_paths(untracked or b""):
        listing.skipped.append(Skipped(_display(root, root / rel.rstrip("/")) + ("/" if rel.endswith("/") else ""),
                                       "not tracked by git"))
    ignored = _git(root, "ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--directory")
    for rel in _z_paths(ignored or b""):
        listing.skipped.append(Skipped(_display(root, root / rel.rstrip("/")) + ("/" if rel.endswith("/") else ""),
                                       "ignored by .gitignore"))
    return listing


# -- zip archives ------------------------------------------------------------------------------------------------

_DRIVE = re.compile(r"^[A-Za-z]:")


def _safe_member_name(name: str) -> str | None:
    """The normalized '/'-path of an archive member, or None when it would leave the extraction root."""
    name = name.replace("\\", "/")
    if name.startswith("/") or _DRIVE.match(name):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or not parts:
        return None
    return "/".join(parts)


def _list_zip(archive: Path, limits: IngestLimits) -> Listing:
    listing = Listing(origin=str(archive), source_type="zip")
    try:
        fd = open_regular(archive.parent, archive.name)
    except SourceReadError as exc:
        listing.skipped.append(Skipped(archive.name, str(exc)))
        return listing
    except OSError as exc:
        listing.skipped.append(Skipped(archive.name, f"unreadable ({exc.strerror or exc})"))
        return listing
    file = os.fdopen(fd, "rb")
    try:
        zf = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        file.close()
        listing.skipped.append(Skipped(archive.name, f"not a readable zip archive ({exc})"))
        return listing

    def close() -> None:
        zf.close()
        file.close()

    listing.close = close
    inflated_cap = max(limits.max_archive_ratio * os.fstat(fd).st_size, limits.max_file_bytes)
    total = 0
    seen: set[str] = set()
    for number, info in enumerate(zf.infolist()):
        raw = info.filename
        shown = f"{archive.name}/{raw}"
        if number >= limits.max_archive_entries:
            listing.cut(shown, f"archive entry limit reached ({limits.max_archive_entries})")
            continue
        if info.is_dir():
            continue
        name = _safe_member_name(raw)
        if name is None:
            listing.skipped.append(Skipped(shown, "unsafe path in archive (absolute or '..': path traversal)"))
            continue
        display = f"{archive.name}/{name}"
        mode = info.external_attr >> 16
        reason = None
        dir_reasons = [_dir_skip_reason(p) for p in name.split("/")[:-1]]
        if any(dir_reasons):
            reason = next(r for r in dir_reasons if r)
        elif name.rsplit("/", 1)[-1].startswith("."):
            reason = "hidden file"
        elif stat.S_ISLNK(mode):
            reason = "symbolic link in archive (not followed)"
        elif info.flag_bits & 0x1:
            reason = "encrypted archive entry"
        elif name in seen:
            reason = "duplicate entry in archive"
        elif not supported(name):
            ext = extension(name)
            reason = f"unsupported file type '.{ext}'" if ext else "unsupported file type (no extension)"
        elif info.file_size == 0:
            reason = "empty file"
        elif info.file_size > limits.max_file_bytes:
            reason = f"file too large ({info.file_size} bytes, limit {limits.max_file_bytes})"
        elif (info.file_size > limits.ratio_check_min_bytes
              and info.file_size > limits.max_compression_ratio * max(info.compress_size, 1)):
            ratio = info.file_size / max(info.compress_size, 1)
            reason = (f"compression ratio {ratio:.0f}:1 over the limit {limits.max_compression_ratio:.0f}:1 "
                      f"(possible zip bomb)")
        if reason is not None:
            listing.skipped.append(Skipped(display, reason))
            continue
        if total + info.file_size > limits.max_archive_bytes:
            listing.cut(display, f"archive size limit reached ({limits.max_archive_bytes} bytes inflated)")
            continue
        if total + info.file_size > inflated_cap:
            listing.cut(display, f"archive inflates to more than {limits.max_archive_ratio:g} times the archive's "
                                 f"size (possible zip bomb)")
            continue
        seen.add(name)
        total += info.file_size
        listing.files.append(SourceFile(origin=str(archive), relpath=name, path=display, size=info.file_size,
                                        mtime_ns=_zip_mtime_ns(info), source_type="zip",
                                        read=_zip_reader(zf, info, limits)))
    return listing


def _zip_mtime_ns(info: zipfile.ZipInfo) -> int:
    import datetime

    try:
        stamp = datetime.datetime(*info.date_time).timestamp()
    except (ValueError, OverflowError):
        stamp = 0.0
    # The CRC tells two same-size versions with the same 2-second timestamp apart.
    return int(stamp) * 1_000_000_000 + (info.CRC % 1_000_000_000)


def _zip_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: IngestLimits) -> Callable[[], bytes]:
    def read() -> bytes:
        # The header's size can lie: read at most one byte past it and refuse an entry that inflates further.
        try:
            with zf.open(info) as member:
                data = member.read(info.file_size + 1)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, ValueError) as exc:
            raise SourceReadError(f"unreadable archive entry ({exc})") from exc
        except Exception as exc:  # zlib/bz2/lzma raise their own errors on corrupt streams
            raise SourceReadError(f"corrupt archive entry ({type(exc).__name__}: {exc})") from exc
        if len(data) > info.file_size:
            raise SourceReadError("entry inflates past its declared size (possible zip bomb)")
        return data

    return read
