"""Hostile sources: entries that resolve outside their root, links to hidden files, FIFOs where a file or an archive
is expected, file names that are not UTF-8, and archives that inflate far past their own size."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from retrieval_helpers import write

from retrieval.sources import IngestLimits, SourceReadError, list_source

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")


def reasons(listing) -> dict[str, str]:
    return {s.path: s.reason for s in listing.skipped}


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-C", str(root), *args],
                   check=True, capture_output=True)


def make_repo(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        write(root / rel, text)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    return root


def list_in_child(path: Path, timeout: float = 20.0) -> str:
    """`list_source(path)` in a child process, so that a blocking open fails the test instead of hanging it;
    returns the child's output (one 'path: reason' line per skipped entry, then the listed paths)."""
    code = ("import sys\nfrom retrieval.sources import list_source\n"
            "listing = list_source(sys.argv[1])\n"
            "for s in listing.skipped: print('SKIP', s.path, '|', s.reason)\n"
            "for f in listing.files: print('FILE', f.path)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"listing {path.name} blocked for more than {timeout:.0f} s")
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- entries that resolve outside their root (parents included) ------------------------------------------------

@needs_git
def test_git_tracked_folder_replaced_by_a_link_to_an_outside_folder(tmp_path):
    outside = tmp_path / "outside"
    write(outside / "secret.conf", "password = hunter2\n")
    repo = make_repo(tmp_path / "repo", {"sub/secret.conf": "placeholder = 1\n", "README.md": "# Repo\n"})
    shutil.rmtree(repo / "sub")
    os.symlink(outside, repo / "sub")

    listing = list_source(repo)
    assert [f.path for f in listing.files] == ["repo/README.md"]
    assert "leaves the root" in reasons(listing)["repo/sub/secret.conf"]


def test_folder_replaced_by_an_outside_link_after_listing_is_not_read(tmp_path):
    outside = write(tmp_path / "outside" / "notes.md", "outside secret\n").parent
    root = tmp_path / "proj"
    write(root / "sub" / "notes.md", "inside\n")
    listing = list_source(root)
    (entry,) = listing.files
    shutil.rmtree(root / "sub")
    os.symlink(outside, root / "sub")
    with pytest.raises(SourceReadError, match="leaves the root"):
        entry.read()


def test_file_replaced_by_an_outside_link_after_listing_is_not_read(tmp_path):
    secret = write(tmp_path / "secret.md", "outside secret\n")
    root = tmp_path / "proj"
    path = write(root / "notes.md", "inside\n")
    (entry,) = list_source(root).files
    path.unlink()
    os.symlink(secret, path)
    with pytest.raises(SourceReadError, match="leaves the root"):
        entry.read()


def test_given_file_replaced_by_a_link_after_listing_is_not_read(tmp_path):
    secret = write(tmp_path / "secret.md", "outside secret\n")
    upload = write(tmp_path / "uploads" / "notes.md", "uploaded\n")
    (entry,) = list_source(upload).files
    upload.unlink()
    os.symlink(secret, upload)
    with pytest.raises(SourceReadError, match="leaves the root"):
        entry.read()


def test_link_to_a_hidden_file_or_folder_is_hidden(tmp_path):
    root = tmp_path / "proj"
    write(root / ".env", "API_KEY=secret\n")
    write(root / ".private" / "notes.md", "private notes\n")
    write(root / "visible.md", "visible\n")
    os.symlink(".env", root / "alias.txt")
    os.symlink(".private/notes.md", root / "notes.md")
    os.symlink("visible.md", root / "again.md")
    listing = list_source(root)
    assert sorted(f.path for f in listing.files) == ["proj/again.md", "proj/visible.md"]
    skipped = reasons(listing)
    assert "hidden file" in skipped["proj/alias.txt"]
    assert "hidden folder" in skipped["proj/notes.md"]


@needs_git
def test_tracked_link_to_a_hidden_file_is_hidden(tmp_path):
    repo = tmp_path / "repo"
    write(repo / ".env", "API_KEY=secret\n")
    write(repo / "README.md", "# Repo\n")
    os.symlink(".env", repo / "alias.txt")
    make_repo(repo, {})
    listing = list_source(repo)
    assert [f.path for f in listing.files] == ["repo/README.md"]
    assert "hidden file" in reasons(listing)["repo/alias.txt"]


def test_gitignore_linked_to_another_gitignore_inside_the_root_applies(tmp_path):
    root = tmp_path / "proj"
    write(root / ".gitignore", "*.tmp.md\n")
    write(root / "sub" / "a.tmp.md", "ignored\n")
    write(root / "sub" / "b.md", "kept\n")
    os.symlink("../.gitignore", root / "sub" / ".gitignore")
    listing = list_source(root)
    assert [f.path for f in listing.files] == ["proj/sub/b.md"]
    assert reasons(listing)["proj/sub/a.tmp.md"] == "ignored by .gitignore"


# -- nothing is opened before it is known to be a regular file --------------------------------------------------

def test_fifo_named_like_a_zip_is_refused_without_blocking(tmp_path):
    pipe = tmp_path / "pipe.zip"
    os.mkfifo(pipe)
    out = list_in_child(pipe)
    assert "SKIP pipe.zip | not a regular file" in out


def test_gitignore_that_cannot_be_applied_skips_its_folder_without_blocking(tmp_path):
    root = tmp_path / "proj"
    write(root / "a.md", "text\n")
    os.mkfifo(root / ".gitignore")
    write(root / "sub" / "b.md", "text\n")
    write(root / "sub" / ".gitignore", "*.tmp\n" * 20_000)  # over the size limit: the rules cannot be honoured
    out = list_in_child(root)
    assert "SKIP proj/ | .gitignore not usable (not a regular file); folder not walked" in out
    assert "FILE" not in out
    listing = list_source(root / "sub")
    assert not listing.files
    assert "file too large" in reasons(listing)["sub/"]


@pytest.mark.timeout(20)
def test_file_replaced_by_a_fifo_after_listing_is_refused_without_blocking(tmp_path):
    root = tmp_path / "proj"
    path = write(root / "a.md", "text\n")
    (entry,) = list_source(root).files
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(SourceReadError, match="not a regular file"):
        entry.read()


# -- file names that are not UTF-8 -------------------------------------------------------------------------------

def _bytes_name(folder: Path, name: bytes, data: bytes) -> None:
    with open(os.path.join(os.fsencode(folder), name), "wb") as f:
        f.write(data)


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses names that are not UTF-8")
def test_file_and_folder_names_that_are_not_utf8_are_skipped_with_a_reason(tmp_path):
    root = tmp_path / "proj"
    write(root / "good.txt", "good\n")
    _bytes_name(root, b"caf\xe9.txt", b"latin-1 name\n")
    os.mkdir(os.path.join(os.fsencode(root), b"d\xffir"))
    _bytes_name(root / os.fsdecode(b"d\xffir"), b"inner.txt", b"inner\n")
    listing = list_source(root)
    assert [f.path for f in listing.files] == ["proj/good.txt"]
    skipped = reasons(listing)
    assert "not valid UTF-8" in skipped["proj/caf\\xe9.txt"]
    assert "not valid UTF-8" in skipped["proj/d\\xffir/"]
    for s in listing.skipped:
        s.path.encode("utf-8")  # every reported path can be printed and stored


@needs_git
@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses names that are not UTF-8")
def test_tracked_file_name_that_is_not_utf8_is_skipped_with_a_reason(tmp_path):
    repo = tmp_path / "repo"
    write(repo / "good.txt", "good\n")
    _bytes_name(repo, b"caf\xe9.txt", b"latin-1 name\n")
    make_repo(repo, {})
    listing = list_source(repo)
    assert [f.path for f in listing.files] == ["repo/good.txt"]
    assert "not valid UTF-8" in reasons(listing)["repo/caf\\xe9.txt"]


# -- archives that inflate far past their own size --------------------------------------------------------------

def test_archive_inflating_past_the_ratio_of_its_size_is_cut(tmp_path):
    # Each entry passes the per-entry ratio check (set high here); together they inflate past 20x the archive.
    archive = tmp_path / "amplify.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(40):
            zf.writestr(f"e{i:02}.txt", (f"entry {i} " + "la " * 30 + "\n") * 3000)
    limits = IngestLimits(max_archive_ratio=20.0, max_compression_ratio=10_000, max_file_bytes=400_000)
    listing = list_source(archive, limits)
    try:
        inflated = sum(f.size for f in listing.files)
        assert 0 < inflated <= max(20 * archive.stat().st_size, limits.max_file_bytes)
        cut = [s for s in listing.skipped if "times the archive's size" in s.reason]
        assert len(cut) == 40 - len(listing.files) > 0
        assert not listing.complete
    finally:
        listing.close()


def test_small_archives_are_not_cut_by_the_ratio(tmp_path):
    archive = tmp_path / "small.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(3):
            zf.writestr(f"e{i}.txt", "same words again " * 2000)
    listing = list_source(archive, IngestLimits(max_archive_ratio=2.0))
    assert len(listing.files) == 3 and listing.complete
    listing.close()


def test_document_limit_of_a_listing(tmp_path):
    root = tmp_path / "proj"
    for i in range(5):
        write(root / f"f{i}.md", f"file {i}\n")
    listing = list_source(root, IngestLimits(max_files=3))
    assert len(listing.files) == 3 and not listing.complete
    assert sum("file limit reached" in s.reason for s in listing.skipped) == 2
