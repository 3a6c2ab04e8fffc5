"""The README's command table and global options against the argparse parser behind `tpa-rag --help`.

Every sub-command, action and option the parser knows appears in the README, and the README names nothing the
parser does not know: the table cannot drift from `--help`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from app.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `([^`]+)` \| .+ \|$")  # | `command [action|...] [options] ARGS` | what it does |
OPTION = re.compile(r"(?<![\w-])(--?[a-z][a-z0-9-]*)")
ACTIONS = re.compile(r"^[a-z]+(\|[a-z]+)*$")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_groups(parser: argparse.ArgumentParser) -> list[tuple[str, ...]]:
    """Each optional argument's spellings (`-v`, `--verbose`), help left out."""
    return [tuple(a.option_strings) for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _readme_rows() -> dict[str, dict[str, set[str]]]:
    """command -> {"actions": names, "options": spellings} from the README's table (several rows may share one)."""
    rows: dict[str, dict[str, set[str]]] = {}
    lines = README.read_text().splitlines()
    start = lines.index("All sub-commands:")
    for line in lines[start + 1:]:
        if line.startswith("Global options:"):
            break
        match = ROW.match(line)
        if not match:
            continue
        words = match.group(1).replace("\\|", "|").split()
        entry = rows.setdefault(words[0], {"actions": set(), "options": set()})
        if len(words) > 1 and ACTIONS.match(words[1]):
            entry["actions"].update(words[1].split("|"))
        entry["options"].update(OPTION.findall(" ".join(words[1:])))
    return rows


def _check_options(where: str, groups: list[tuple[str, ...]], documented: set[str]) -> list[str]:
    problems = [f"{where}: {'/'.join(g)} is not in the README" for g in groups if not documented & set(g)]
    known = {s for g in groups for s in g}
    problems += [f"{where}: the README names {o}, which the parser does not know" for o in documented - known]
    return problems


def test_every_command_and_option_is_documented_and_nothing_else() -> None:
    parser = build_parser()
    commands = _subparsers(parser)
    rows = _readme_rows()
    problems = [f"command {c!r} is missing from the README's table" for c in commands.keys() - rows.keys()]
    problems += [f"the README's table lists {c!r}, which tpa-rag does not have" for c in rows.keys() - commands.keys()]
    for name in commands.keys() & rows.keys():
        sub = commands[name]
        actions = _subparsers(sub)
        if set(actions) != rows[name]["actions"]:
            problems.append(f"{name}: actions {sorted(actions)} in the parser, {sorted(rows[name]['actions'])} in "
                            f"the README")
        groups = _option_groups(sub) + [g for a in actions.values() for g in _option_groups(a)]
        problems += _check_options(name, groups, rows[name]["options"])
    assert not problems, "\n".join(problems)


def test_global_options_are_documented() -> None:
    line = next(row for row in README.read_text().splitlines() if row.startswith("Global options:"))
    problems = _check_options("global", _option_groups(build_parser()), set(OPTION.findall(line)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("break_it", ["drop a row", "unknown option"])
def test_the_check_sees_drift(break_it: str, monkeypatch, tmp_path: Path) -> None:
    text = README.read_text()
    if break_it == "drop a row":
        text = "\n".join(row for row in text.splitlines() if not row.startswith("| `search "))
    else:
        text = text.replace("| `ingest --collection NAME", "| `ingest --collection NAME [--recursive]")
    fake = tmp_path / "README.md"
    fake.write_text(text)
    monkeypatch.setitem(globals(), "README", fake)
    with pytest.raises(AssertionError):
        test_every_command_and_option_is_documented_and_nothing_else()
