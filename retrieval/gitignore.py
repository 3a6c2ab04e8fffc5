""".gitignore matching for folders that are not git work trees (inside one, `git ls-files` decides).

Covers the syntax of gitignore(5): comments, escaped `#`/`!`/trailing spaces, negation with `!`, directory-only
patterns (`dir/`), anchoring (a `/` at the start or in the middle ties a pattern to its .gitignore's folder, a bare
name matches at any depth), `*`, `?`, `[...]` classes and `**` (leading `**/`, trailing `/**`, inner `/**/`).
The last matching rule wins, rules of deeper .gitignore files come after those of shallower ones. As in git, a
file inside an ignored folder cannot be re-included: the walker never descends into an ignored folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class _Rule:
    base: str  # folder of the .gitignore, relative to the root, "" or ending in "/"
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


def _translate(glob: str) -> str:
    """Regex source for one gitignore glob (no anchoring decisions here)."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            if glob.startswith("**", i):
                at_start = i == 0 or glob[i - 1] == "/"
                at_end = i + 2 == n or glob[i + 2] == "/"
                if at_start and at_end:
                    if i + 2 == n:
                        out.append(".*")  # "a/**": everything inside a
                        i += 2
                    else:
                        out.append("(?:.*/)?")  # "**/" : zero or more folders
                        i += 3
                    continue
                out.append("[^/]*")  # "a**b" is a plain star in git
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(glob[i]))
        elif c == "[":
            j = i + 1
            if j < n and glob[j] in "!^":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                out.append(re.escape(c))  # an unclosed bracket is literal
            else:
                body = glob[i + 1:j]
                negate = body[:1] in ("!", "^")
                if negate:
                    body = body[1:]
                body = body.replace("\\", "\\\\").replace("[", "\\[")
                out.append(f"[^/{body}]" if negate else f"[{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def parse_line(line: str, base: str) -> _Rule | None:
    """One .gitignore line -> a rule, or None for blanks and comments. `base` is "" or "sub/dir/"."""
    line = line.rstrip("\n").rstrip("\r")
    if not line or line.startswith("#"):
        return None
    # Trailing spaces are dropped unless escaped with a backslash.
    stripped = line.rstrip(" ")
    if stripped.endswith("\\") and len(stripped) < len(line):
        stripped += " "
    line = stripped
    negate = line.startswith("!")
    if negate:
        line = line[1:]
    elif line.startswith("\\!") or line.startswith("\\#"):
        line = line[1:]
    dir_only = line.endswith("/") and not line.endswith("\\/")
    if dir_only:
        line = line.rstrip("/")
    if not line:
        return None
    anchored = "/" in line
    line = line.lstrip("/")
    source = _translate(line)
    if not anchored:
        source = "(?:.*/)?" + source
    return _Rule(base=base, regex=re.compile(source, re.DOTALL), negate=negate, dir_only=dir_only)


class GitIgnore:
    """The rules of every .gitignore met so far under one root."""

    def __init__(self) -> None:
        self._rules: list[_Rule] = []

    def add(self, folder: str, content: str) -> None:
        """Add the rules of `<folder>/.gitignore`; `folder` is relative to the root, "" for the root itself."""
        base = folder.strip("/")
        base = base + "/" if base else ""
        for line in content.splitlines():
            rule = parse_line(line, base)
            if rule is not None:
                self._rules.append(rule)

    def ignored(self, path: str, is_dir: bool) -> bool:
        """Whether `path` (relative to the root, '/'-separated) is ignored; its parents are assumed not to be."""
        verdict = False
        for rule in self._rules:
            if rule.dir_only and not is_dir:
                continue
            if not path.startswith(rule.base):
                continue
            if rule.regex.fullmatch(path[len(rule.base):]):
                verdict = not rule.negate
        return verdict
