"""The .gitignore matcher against the cases of gitignore(5)."""

from __future__ import annotations

import pytest

from retrieval.gitignore import GitIgnore

ROOT_RULES = r"""
# a comment
*.log
!keep.log
build/
/top.txt
docs/**/*.tmp
cache/**
**/generated
foo[0-9].c
bar[!a-c].c
\#hash
\!bang
trailing\ 
a?c.txt
"""


@pytest.fixture
def rules() -> GitIgnore:
    g = GitIgnore()
    g.add("", ROOT_RULES)
    g.add("sub", "*.md\n!README.md\n/local.txt\n")
    return g


@pytest.mark.parametrize("path,is_dir,ignored", [
    ("x.log", False, True),
    ("deep/er/x.log", False, True),
    ("keep.log", False, False),  # negation
    ("build", True, True),
    ("src/build", True, True),
    ("build", False, False),  # dir-only pattern, a file named build
    ("top.txt", False, True),
    ("sub/top.txt", False, False),  # anchored to the root
    ("docs/x.tmp", False, True),  # ** matches zero folders
    ("docs/a/b/x.tmp", False, True),
    ("cache/x", False, True),
    ("cache", True, False),  # "cache/**" matches inside, not the folder itself
    ("generated", True, True),
    ("a/b/generated", False, True),
    ("foo1.c", False, True),
    ("fooa.c", False, False),
    ("bard.c", False, True),
    ("bara.c", False, False),
    ("#hash", False, True),
    ("!bang", False, True),
    ("trailing ", False, True),  # escaped trailing space kept
    ("abc.txt", False, True),
    ("a/c.txt", False, False),  # ? does not match /
    ("sub/x.md", False, True),  # nested .gitignore applies below its folder
    ("sub/README.md", False, False),
    ("x.md", False, False),  # ... and not above it
    ("sub/local.txt", False, True),
    ("sub/deeper/local.txt", False, False),
    ("plain.txt", False, False),
])
def test_gitignore_cases(rules, path, is_dir, ignored):
    assert rules.ignored(path, is_dir) is ignored


def test_later_rules_win():
    g = GitIgnore()
    g.add("", "!important.log\n*.log\n")
    assert g.ignored("important.log", False)
    g.add("", "!important.log\n")
    assert not g.ignored("important.log", False)
