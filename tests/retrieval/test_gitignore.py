"""The .gitignore matcher against the cases of gitignore(5)."""

from __future__ import annotations

import os
import subprocess
import sys

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


def test_reinclude_inside_a_folder_whose_content_is_ignored():
    g = GitIgnore()
    g.add("", "logs/*\n!logs/keep.md\ncache/**\n!cache/keep.md\nbuild/\n!build/keep.md\n")
    assert not g.ignored("logs", is_dir=True)  # "logs/*" ignores the content, not the folder: git descends
    assert g.ignored("logs/run.md", is_dir=False)
    assert not g.ignored("logs/keep.md", is_dir=False)
    assert not g.ignored("cache", is_dir=True)
    assert not g.ignored("cache/keep.md", is_dir=False)
    assert g.ignored("build", is_dir=True)  # an ignored folder is not entered, so nothing in it comes back


def test_invalid_lines_are_dropped_and_the_others_kept():
    g = GitIgnore()
    g.add("", "*.tmp\n!\ntrailing\\\n[unclosed\n*.bak\n")
    assert g.ignored("a.tmp", False) and g.ignored("b.bak", False)
    assert not g.ignored("plain.md", False)


def test_pathological_pattern_matches_in_linear_time():
    # A backtracking regex needs minutes here: every '*' can end at any of the 60 'a's.
    code = ("import time\nfrom retrieval.gitignore import GitIgnore\n"
            "g = GitIgnore()\ng.add('', '*a*a*a*a*a*a*a*a*b\\n')\n"
            "t = time.perf_counter()\n"
            "hits = [g.ignored('a' * n, False) for n in (60, 1000, 100_000)]\n"
            "print(hits, time.perf_counter() - t)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env,
                              check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("matching '*a*a*a*a*a*a*a*a*b' against 60 'a's took more than 30 s")
    assert done.returncode == 0, done.stderr
    seconds = float(done.stdout.rsplit(" ", 1)[1])
    assert done.stdout.startswith("[False, False, False]")
    assert seconds < 0.5, f"{seconds:.3f} s"


def test_long_gitignore_is_applied_whole():
    # Thousands of rules: more than RE2 compiles into one set with its default memory budget.
    g = GitIgnore()
    g.add("", "".join(f"generated_{i}.py\n" for i in range(5000)) + "!generated_4999.py\n")
    assert g.ignored("generated_0.py", False) and g.ignored("deep/generated_2500.py", False)
    assert not g.ignored("generated_4999.py", False) and not g.ignored("generated_5000.py", False)
