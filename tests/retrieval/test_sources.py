"""What gets listed for ingestion and what is skipped (with the reason): folders, git work trees, zip archives."""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from retrieval_helpers import write

from retrieval.errors import SourceNotFoundError
from retrieval.sources import IngestLimits, SourceReadError, list_source


def reasons(listing) -> dict[str, str]:
    return {s.path: s.reason for s in listing.skipped}


def test_folder_rules(tmp_path):
    root = tmp_path / "proj"
    outside = write(tmp_path / "secret.txt", "outside the root")
    write(root / "main.py", "print('main')\n")
    write(root / "docs" / "guide.md", "# Guide\n")
    write(root / ".hidden.py", "x = 1\n")
    write(root / ".git_like" / "config.py", "x = 1\n")
    write(root / "node_modules" / "lib" / "index.js", "module.exports = 1\n")
    write(root / "pkg" / "__pycache__" / "m.cpython-311.pyc", b"\x00\x01")
    write(root / "build" / "out.txt", "built\n")
    write(root / ".gitignore", "*.log\nignored_dir/\n!keep.log\n")
    write(root / "app.log", "log line\n")
    write(root / "keep.log", "kept log\n")
    write(root / "ignored_dir" / "a.py", "a = 1\n")
    write(root / "sub" / ".gitignore", "local.py\n")
    write(root / "sub" / "local.py", "x = 1\n")
    write(root / "sub" / "other.py", "y = 2\n")
    write(root / "image.png", b"\x89PNG\r\n")
    write(root / "empty.txt", "")
    write(root / "big.txt", "x" * 2000)
    write(root / "inner.zip", b"PK")
    os.symlink(outside, root / "escape.txt")
    os.symlink(tmp_path, root / "escape_dir")
    os.symlink(root / "main.py", root / "alias.py")
    os.symlink(root / "missing.py", root / "dangling.py")
    os.mkfifo(root / "pipe.txt")

    listing = list_source(root, IngestLimits(max_file_bytes=1000))
    files = sorted(f.path for f in listing.files)
    assert files == ["proj/alias.py", "proj/docs/guide.md", "proj/main.py", "proj/sub/other.py"]
    skipped = reasons(listing)
    expected = {
        "proj/.hidden.py": "hidden file",
        "proj/.gitignore": "hidden file",
        "proj/.git_like/": "hidden folder",
        "proj/node_modules/": "vendored",
        "proj/pkg/__pycache__/": "vendored",
        "proj/build/": "vendored",
        "proj/app.log": "ignored by .gitignore",
        "proj/ignored_dir/": "ignored by .gitignore",
        "proj/sub/local.py": "ignored by .gitignore",
        "proj/image.png": "unsupported file type '.png'",
        "proj/empty.txt": "empty file",
        "proj/big.txt": "file too large",
        "proj/inner.zip": "archive inside a folder",
        "proj/escape.txt": "symbolic link leaves the root",
        "proj/escape_dir/": "symbolic link leaves the root",
        "proj/dangling.py": "broken symbolic link",
        "proj/pipe.txt": "not a regular file",
        "proj/keep.log": "unsupported file type '.log'",  # re-included by the .gitignore, but not a type we read
    }
    for path, reason in expected.items():
        assert path in skipped, f"{path} not reported"
        assert reason in skipped[path], (path, skipped[path])
    # Nothing inside skipped folders is listed file by file.
    assert not any(p.startswith("proj/node_modules/lib") for p in skipped)


def test_symlink_inside_root_reads_the_target(tmp_path):
    root = tmp_path / "r"
    write(root / "real.md", "real text\n")
    os.symlink(root / "real.md", root / "link.md")
    listing = list_source(root)
    by_path = {f.path: f for f in listing.files}
    assert by_path["r/link.md"].read() == b"real text\n"


def test_single_file_and_missing_path(tmp_path):
    f = write(tmp_path / "note.txt", "hello\n")
    listing = list_source(f)
    assert [(x.path, x.relpath, x.origin) for x in listing.files] == [("note.txt", "note.txt", str(f))]
    with pytest.raises(SourceNotFoundError):
        list_source(tmp_path / "nope")


def test_file_growing_past_the_limit_after_listing(tmp_path):
    f = write(tmp_path / "grow.txt", "small\n")
    listing = list_source(f, IngestLimits(max_file_bytes=100))
    f.write_text("x" * 500)
    with pytest.raises(SourceReadError, match="too large"):
        listing.files[0].read()


GIT = shutil.which("git")


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-C", str(root), *args],
                   check=True, capture_output=True)


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_git_repository_lists_tracked_files_only(tmp_path):
    repo = tmp_path / "repo"
    write(repo / "src" / "lib.py", "def f():\n    return 1\n")
    write(repo / "README.md", "# Repo\n")
    write(repo / ".gitignore", "*.tmp\n")
    write(repo / "vendor" / "dep.py", "x = 1\n")
    git(repo, "init", "-q")
    git(repo, "add", "src/lib.py", "README.md", ".gitignore", "vendor/dep.py")
    git(repo, "commit", "-q", "-m", "init")
    write(repo / "untracked.py", "u = 1\n")
    write(repo / "scratch.tmp", "t\n")
    (repo / "README.md").unlink()

    listing = list_source(repo)
    assert listing.source_type == "git"
    assert sorted(f.path for f in listing.files) == ["repo/src/lib.py"]
    skipped = reasons(listing)
    assert skipped["repo/untracked.py"] == "not tracked by git"
    assert skipped["repo/scratch.tmp"] == "ignored by .gitignore"
    assert skipped["repo/README.md"] == "tracked by git but missing from the work tree"
    assert skipped["repo/.gitignore"] == "hidden file"
    assert "vendored" in skipped["repo/vendor/"]
    # A subfolder of the work tree: its tracked files, paths relative to it.
    sub = list_source(repo / "src")
    assert [f.relpath for f in sub.files] == ["lib.py"]


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_folder_ignored_by_enclosing_repository_is_walked(tmp_path):
    repo = tmp_path / "repo"
    write(repo / ".gitignore", "data/\n")
    write(repo / "data" / "notes.md", "# Notes\n")
    git(repo, "init", "-q")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-q", "-m", "init")
    listing = list_source(repo / "data")
    assert listing.source_type == "folder"
    assert [f.path for f in listing.files] == ["data/notes.md"]


def make_zip(path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data,
                        compress_type=zipfile.ZIP_DEFLATED)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)
    return path


def test_zip_safety(tmp_path):
    archive = make_zip(tmp_path / "bundle.zip", {
        "docs/ok.md": b"# Fine\n",
        "../evil.py": b"print('escape')\n",
        "/abs.py": b"x = 1\n",
        "C:/win.py": b"x = 1\n",
        "a/../../b.py": b"x = 1\n",
        "bomb.txt": b"\0" * (5 * 1024 * 1024),
        "big.txt": os.urandom(3000).hex().encode(),
        "empty.md": b"",
        "node_modules/x.js": b"x\n",
        "picture.jpg": b"\xff\xd8",
    }, symlinks={"link.py": "/etc/passwd"})
    listing = list_source(archive, IngestLimits(max_file_bytes=8 * 1024 * 1024, max_compression_ratio=100))
    try:
        assert [f.path for f in listing.files] == ["bundle.zip/docs/ok.md", "bundle.zip/big.txt"]
        assert listing.files[0].read() == b"# Fine\n"
        skipped = reasons(listing)
        for name in ("../evil.py", "/abs.py", "C:/win.py", "a/../../b.py"):
            assert "path traversal" in skipped[f"bundle.zip/{name}"], name
        assert "zip bomb" in skipped["bundle.zip/bomb.txt"]
        assert "symbolic link" in skipped["bundle.zip/link.py"]
        assert skipped["bundle.zip/empty.md"] == "empty file"
        assert "vendored" in skipped["bundle.zip/node_modules/x.js"]
        assert "unsupported" in skipped["bundle.zip/picture.jpg"]
    finally:
        listing.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.zip"], "nothing may be extracted"


def test_zip_size_limits_and_entry_count(tmp_path):
    archive = make_zip(tmp_path / "many.zip", {f"f{i}.txt": f"file {i}\n".encode() * 50 for i in range(6)})
    listing = list_source(archive, IngestLimits(max_file_bytes=100, max_archive_entries=10))
    assert not listing.files and all("too large" in s.reason for s in listing.skipped)
    listing = list_source(archive, IngestLimits(max_archive_bytes=1000, max_archive_entries=4))
    skipped = [s.reason for s in listing.skipped]
    assert len(listing.files) == 2
    assert sum("archive size limit" in r for r in skipped) == 2
    assert sum("entry limit" in r for r in skipped) == 2


def _patch_central_directory(data: bytes, name: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite a field of the central-directory record of entry `name`."""
    start = 0
    while True:
        start = data.index(b"PK\x01\x02", start)
        name_len = int.from_bytes(data[start + 28:start + 30], "little")
        if data[start + 46:start + 46 + name_len] == name:
            return data[:start + offset] + value + data[start + offset + len(value):]
        start += 4


def test_zip_entry_that_lies_about_its_size_and_encrypted_entry(tmp_path):
    archive = make_zip(tmp_path / "liar.zip", {"liar.txt": b"a" * 1000 + b"\n", "locked.txt": b"secret\n",
                                               "fine.txt": b"fine\n"})
    data = archive.read_bytes()
    data = _patch_central_directory(data, b"liar.txt", 24, (10).to_bytes(4, "little"))  # uncompressed size
    data = _patch_central_directory(data, b"locked.txt", 8, (1).to_bytes(2, "little"))  # encrypted flag
    archive.write_bytes(data)
    listing = list_source(archive)
    skipped = reasons(listing)
    assert skipped["liar.zip/locked.txt"] == "encrypted archive entry"
    by_path = {f.path: f for f in listing.files}
    assert by_path["liar.zip/fine.txt"].read() == b"fine\n"
    with pytest.raises(SourceReadError):
        by_path["liar.zip/liar.txt"].read()
    listing.close()


def test_not_a_zip(tmp_path):
    archive = write(tmp_path / "fake.zip", b"this is not a zip archive")
    listing = list_source(archive)
    assert not listing.files
    assert "not a readable zip archive" in listing.skipped[0].reason
