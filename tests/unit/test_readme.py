"""README.md stays true: every command it shows exists, and every command is documented."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from jobs.cli import app
from jobs.submit import install_submission

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.DOTALL)


def _command_paths(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    # Typer vendors click, so its groups are not click.Group: recognise them by `commands`.
    paths = []
    for name, command in group.commands.items():
        if getattr(command, "hidden", False):
            continue
        if hasattr(command, "commands"):
            paths += _command_paths(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


CLI = typer.main.get_command(app)
COMMANDS = _command_paths(CLI)
SHOWN = [
    shlex.split(line)[1:]
    for block in _code_blocks(README)
    for line in block.splitlines()
    if line.startswith(".venv/bin/chromascan ")
]


def test_readme_opens_with_the_two_commands() -> None:
    blocks = _code_blocks(README)
    assert blocks[0].strip() == "scripts/demo"
    assert blocks[1].strip() == "scripts/test"
    ci = (ROOT / ".ci/run").read_text()
    assert "exec scripts/test" in ci


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_is_in_the_readme(path: tuple[str, ...]) -> None:
    if path in {("demo",), ("model", "init")}:  # demo: the main command; init: for tests
        assert "chromascan demo" in README or "scripts/demo" in README
        return
    assert f"chromascan {' '.join(path)}" in README


def test_the_command_list_is_complete() -> None:
    assert {path[0] for path in COMMANDS} >= {"train", "colorize", "nightly", "manifest", "jobs"}
    assert len(COMMANDS) > 15


@pytest.mark.parametrize("argv", SHOWN, ids=lambda argv: " ".join(argv[:2]))
def test_every_command_shown_parses(argv: list[str]) -> None:
    # Resolve the command and parse its options exactly as the CLI would, without running it:
    # a renamed or removed option fails here.
    cli = typer.main.get_command(app)
    install_submission(cli, argv)  # what main() does: adds --address and friends
    context = cli.make_context("chromascan", list(argv))
    command: Any = cli
    while hasattr(command, "commands"):
        name, command, rest = command.resolve_command(
            context, context._protected_args + context.args
        )
        context = command.make_context(name, rest, parent=context)
    assert not hasattr(context.command, "commands")
