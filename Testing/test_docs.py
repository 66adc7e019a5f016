"""The README and docs stay true: every `corx` command in them parses with the real argument parser,
every option it names exists, every figure they show exists, every option has a help text, and the
project speaks of its versions, dates and commits, not of machine paths."""
import argparse
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from CoRXRegistrationLib.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def fenced_commands(text):
    """`corx ...` command lines of the fenced code blocks (continuations joined, comments dropped)."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            m = re.match(r"^(?:\.venv/bin/)?corx\s+(.*)$", line)
            if m:
                yield m.group(1)


def inline_commands(text):
    """`corx SUBCOMMAND --option ...` spans in running text (often partial: only names are checked)."""
    for span in re.findall(r"`((?:\.venv/bin/)?corx [^`]+)`", text):
        yield re.sub(r"^(?:\.venv/bin/)?corx\s+", "", span)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_command_parses(doc):
    parser, _ = subparsers()
    commands = list(fenced_commands(doc.read_text()))
    for command in commands:
        argv = [a for a in shlex.split(command) if not (a.startswith("[") or a.endswith("]"))]
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:
            if exit_.code != 0:
                pytest.fail(f"{doc.name}: `corx {command}` does not parse with the current CLI")
    if doc.name == "README.md":
        assert len(commands) >= 5


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_option_named_in_running_text_exists(doc):
    _, commands = subparsers()
    for span in inline_commands(doc.read_text()):
        words = span.split()
        if words[0].startswith("--"):                     # a top-level option such as --version
            assert words[0] in ("--version", "--help"), span
            continue
        assert words[0] in commands, f"{doc.name}: no corx command '{words[0]}' ({span})"
        known = {o for a in commands[words[0]]._actions for o in a.option_strings}
        unknown = [w for w in words[1:] if w.startswith("--") and w.split("=")[0] not in known]
        assert not unknown, f"{doc.name}: corx {words[0]} has no option {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_figure_shown_exists(doc):
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", doc.read_text()):
        assert (doc.parent / target).is_file(), f"{doc.name} shows {target}, which does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_linked_document_exists(doc):
    for target in re.findall(r"\]\(((?:docs/)?[\w-]+\.md)(?:#[\w-]+)?\)", doc.read_text()):
        assert (doc.parent / target).is_file(), f"{doc.name} links {target}, which does not exist"


def test_every_option_has_a_help_text_and_the_version_is_printed():
    parser, commands = subparsers()
    missing = [f"{name} {a.option_strings}" for name, sub in commands.items() for a in sub._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--version"])
    assert exit_.value.code == 0


def tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.split()]


def test_the_project_names_versions_dates_and_commits_not_work_rounds():
    pattern = re.compile(r"sessions? [0-9]+|session-[0-9]+|(last|next|previous|earlier|later) session", re.I)
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in tracked("*.md", "*.py", "*.json", "*.sh")
            for i, line in enumerate(p.read_text(errors="ignore").splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_model_cards_carry_no_machine_paths():
    cards = tracked("*.json", "*.md")
    cards = [p for p in cards if p.parent.name in ("Models", "models")]
    assert cards
    for card in cards:
        text = card.read_text()
        assert not re.search(r"(^|[\s'\"(])/(work|tmp|home|root|Users)/", text), card
