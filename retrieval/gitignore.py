""".gitignore matching for folders that are not git work trees (inside one, `git ls-files` decides).

The rules of each .gitignore are parsed and matched by `pathspec` (`GitIgnoreSpec`: gitignore(5) syntax,
negation, anchoring, `**`) on its RE2 backend: pathspec's default backend is Python's backtracking `re`, where a
line such as `*a*a*a*a*a*a*a*a*b` takes minutes on a 60-character name; RE2 matches in linear time.

How the folders fit together is decided here: the rules of a .gitignore apply below its folder, deeper files come
after shallower ones and the last matching rule wins. The walker asks about each folder before entering it and
never enters an ignored one, so, as in git, a file inside an ignored folder cannot be re-included. A folder is
matched by its own name (`logs/*` ignores what is inside `logs`, not `logs` itself), with directory-only rules
(`build/`) applying to it; a file is matched by its name, where directory-only rules never apply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pathspec import GitIgnoreSpec
from pathspec.patterns.gitignore import GitIgnorePatternError
from pathspec.patterns.gitignore.spec import GitIgnoreSpecPattern
from re2 import error as Re2Error

log = logging.getLogger(__name__)


class GitIgnoreError(ValueError):
    """A .gitignore whose rules cannot be compiled (the message says why); its folder is walked without it."""


@dataclass(frozen=True)
class _Rules:
    base: str  # folder of the .gitignore, relative to the root: "" or ending in "/"
    files: GitIgnoreSpec  # the lines as written
    folders: GitIgnoreSpec  # the same lines with their directory marks dropped


def _valid_lines(content: str) -> list[str]:
    """The lines of a .gitignore that pathspec accepts; git ignores a malformed line, and so do we."""
    lines = []
    for line in content.splitlines():
        try:
            GitIgnoreSpecPattern(line)
        except GitIgnorePatternError:
            log.info("ignoring a malformed .gitignore line: %r", line)
            continue
        lines.append(line)
    return lines


def _as_folder_rule(line: str) -> str:
    """`line` for matching a folder: a trailing directory mark (`build/`) is satisfied, so it is dropped."""
    body = line.rstrip(" ")
    if body.endswith("\\") and len(body) < len(line):  # an escaped trailing space ends the pattern
        return line
    if body.endswith("/") and not body.endswith("\\/"):
        return body.rstrip("/")
    return line


class GitIgnore:
    """The rules of every .gitignore met so far under one root."""

    def __init__(self) -> None:
        self._rules: list[_Rules] = []

    def add(self, folder: str, content: str) -> None:
        """Add the rules of `<folder>/.gitignore`; `folder` is relative to the root, "" for the root itself.

        Raises GitIgnoreError when the rules are too large for the matcher."""
        lines = _valid_lines(content)
        if not any(line.strip() and not line.startswith("#") for line in lines):
            return
        base = folder.strip("/")
        base = base + "/" if base else ""
        try:
            files = GitIgnoreSpec.from_lines(lines, backend="re2")
            folders = GitIgnoreSpec.from_lines([_as_folder_rule(line) for line in lines], backend="re2")
        except Re2Error as exc:
            raise GitIgnoreError(f"too complex to match ({exc})") from exc
        self._rules.append(_Rules(base, files, folders))

    def ignored(self, path: str, is_dir: bool) -> bool:
        """Whether `path` (relative to the root, '/'-separated) is ignored; its parents are assumed not to be."""
        verdict = False
        for rules in self._rules:
            if not path.startswith(rules.base):
                continue
            spec = rules.folders if is_dir else rules.files
            include = spec.check_file(path[len(rules.base):]).include
            if include is not None:
                verdict = include
        return verdict
