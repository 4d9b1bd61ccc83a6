"""Every help text renders: `indistill --help`, `-h` and each subcommand's `--help`, through `main()`."""

import argparse

import pytest

from indistill.cli import build_parser, main


def _subcommands() -> list[str]:
    """Every subcommand the real parser registers (so a new command is covered without editing this file)."""
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    raise AssertionError("indistill has no subcommands")


def _help(argv: list[str], capsys) -> str:
    # argparse exits 0 after printing help; anything else (a ValueError from %-formatting, a non-zero exit)
    # is the crash a new user meets first.
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 0, (argv, err)
    assert "Traceback" not in out + err
    return out


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_lists_every_command(flag, capsys):
    out = _help([flag], capsys)
    assert out.startswith("usage: indistill")
    for name in _subcommands():
        assert name in out
    assert "95% CIs" in out  # the grid's help text, shown with its literal percent sign


def test_subcommands_are_found():
    assert {"run", "demo", "train", "evaluate", "validate", "grid", "schema"} <= set(_subcommands())


@pytest.mark.parametrize("command", _subcommands())
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_subcommand_help(command, flag, capsys):
    out = _help([command, flag], capsys)
    assert out.startswith(f"usage: indistill {command}")
