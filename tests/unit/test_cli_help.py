"""The `modelforge` command's help names one kind of value one way, in every command."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from modelforge.cli import build_parser

# The metavar of each kind of value the commands take, by the argument's dest.
KINDS = {
    "ref": "REF",  # NAME, NAME:VERSION or NAME@ALIAS
    "name": "NAME",  # a model's name
    "model": "NAME",
    "alias": "ALIAS",
    "version": "VERSION",
    "id": "ID",  # a job's or a dataset's
    "dataset": "ID",
    "request_id": "ID",
    "label": "KEY=VALUE",
    "description": "TEXT",
    "version_label": "TEXT",
    "prefix": "TEXT",
    "timeout": "SECONDS",
    "time_limit": "SECONDS",
    "wait_timeout": "SECONDS",
}


def commands(
    parser: argparse.ArgumentParser, path: str = "modelforge"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command line's parser, the top one first, with the words that reach it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{path} {name}")


def arguments() -> Iterator[tuple[str, argparse.Action]]:
    """Every argument that takes a value, with the command it belongs to."""
    for path, parser in commands(build_parser()):
        for action in parser._actions:
            if action.nargs != 0 and not isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                yield path, action


def where(path: str, action: argparse.Action) -> str:
    return f"{path} {'/'.join(action.option_strings) or action.dest}"


def test_every_value_has_a_metavar_of_its_kind_in_capitals() -> None:
    # A metavar argparse derives from the dest (BATCH_SIZE, MAX_ATTEMPTS) names the flag again, not the value.
    for path, action in arguments():
        if action.choices is not None and action.metavar is None:
            continue  # shown as its choices, {READY,ARCHIVED}
        assert isinstance(action.metavar, str), f"{where(path, action)} needs a metavar naming its kind of value"
        # Capitals, and a file's extension as it is written: FILE.npz|NAME=FILE.npy
        assert re.fullmatch(r"([A-Z]+(\.[a-z]+)?|[=:|])+", action.metavar), where(path, action)
        if action.dest in KINDS:
            assert action.metavar == KINDS[action.dest], where(path, action)
        parse = getattr(action.type, "__qualname__", "")
        if parse.startswith("_whole."):  # a whole number: a count, a port or a version number
            expected = "PORT" if action.dest.endswith("port") else KINDS.get(action.dest, "N")
            assert action.metavar == expected, where(path, action)


@pytest.mark.parametrize("path", [path for path, _ in commands(build_parser())])
def test_every_commands_help_shows_its_metavars(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*path.split()[1:], "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for command, action in arguments():
        if command == path and isinstance(action.metavar, str):
            assert action.metavar in shown, where(command, action)
