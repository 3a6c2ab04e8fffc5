""".gitignore matching for folders that are not git work trees (inside one, `git ls-files` decides).

The rules of each .gitignore are parsed and matched by `pathspec` (`GitIgnoreSpec`: gitignore(5) syntax,
negation, anchoring, `**`) on its RE2 backend: pathspec's default backend is Python's backtracking `re`, where a
line such as `*a*a*a*a*a*a*a*a*b` takes minutes on a 60-character name; RE2 matches in linear time. A long
.gitignore is split into several RE2 sets, matched in order.

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
    """A .gitignore whose rules cannot be compiled (the message says why)."""


# RE2 compiles a set of about two thousand patterns past its default memory budget; a few hundred take milliseconds.
_PATTERNS_PER_SET = 256


@dataclass(frozen=True)
class _Rules:
    base: str  # folder of the .gitignore, relative to the root: "" or ending in "/"
    files: tuple[GitIgnoreSpec, ...]  # the lines as written, in order, a few hundred per set
    folders: tuple[GitIgnoreSpec, ...]  # the same lines with their directory marks dropped


def _patterns(content: str) -> tuple[list[GitIgnoreSpecPattern], list[GitIgnoreSpecPattern]]:
    """The rules of a .gitignore as written and as they apply to a folder; a malformed line is dropped, as git
    drops it, and so are blanks and comments."""
    files, folders = [], []
    for line in content.splitlines():
        try:
            pattern = GitIgnoreSpecPattern(line)
            if pattern.include is None:
                continue
            folder_line = _as_folder_rule(line)
            folder = pattern if folder_line == line else GitIgnoreSpecPattern(folder_line)
        except GitIgnorePatternError:
            log.info("ignoring a malformed .gitignore line: %r", line)
            continue
        files.append(pattern)
        if folder.include is not None:
            folders.append(folder)
    return files, folders


def _as_folder_rule(line: str) -> str:
    """`line` for matching a folder: a trailing directory mark (`build/`) is satisfied, so it is dropped."""
    body = line.rstrip(" ")
    if body.endswith("\\") and len(body) < len(line):  # an escaped trailing space ends the pattern
        return line
    if body.endswith("/") and not body.endswith("\\/"):
        return body.rstrip("/")
    return line


def _compile(patterns: list[GitIgnoreSpecPattern]) -> tuple[GitIgnoreSpec, ...]:
    try:
        return tuple(GitIgnoreSpec(patterns[i:i + _PATTERNS_PER_SET], backend="re2")
                     for i in range(0, len(patterns), _PATTERNS_PER_SET))
    except Re2Error as exc:
        raise GitIgnoreError(f"too complex to match ({exc})") from exc


def _last_verdict(specs: tuple[GitIgnoreSpec, ...], path: str) -> bool | None:
    verdict = None
    for spec in specs:
        include = spec.check_file(path).include
        if include is not None:
            verdict = include
    return verdict


class GitIgnore:
    """The rules of every .gitignore met so far under one root."""

    def __init__(self) -> None:
        self._rules: list[_Rules] = []

    def add(self, folder: str, content: str) -> None:
        """Add the rules of `<folder>/.gitignore`; `folder` is relative to the root, "" for the root itself.

        Raises GitIgnoreError when the rules cannot be compiled."""
        files, folders = _patterns(content)
        if not files:
            return
        base = folder.strip("/")
        base = base + "/" if base else ""
        self._rules.append(_Rules(base, _compile(files), _compile(folders)))

    def ignored(self, path: str, is_dir: bool) -> bool:
        """Whether `path` (relative to the root, '/'-separated) is ignored; its parents are assumed not to be."""
        verdict = False
        for rules in self._rules:
            if not path.startswith(rules.base):
                continue
            found = _last_verdict(rules.folders if is_dir else rules.files, path[len(rules.base):])
            if found is not None:
                verdict = found
        return verdict
