"""The command-line front: version, help, logging and error conventions."""

from __future__ import annotations

import io
import logging
import re

import click
from click.testing import CliRunner

import geoseg_cli
from geoseg_cli.cli import COMMANDS, GeosegGroup, cli, configure_logging
from geoseg_cli.errors import InputError, UsageError
from geoseg_cli.progress import progress


def test_version_matches_package() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"geoseg, version {geoseg_cli.__version__}"


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line]
    assert listed == sorted(COMMANDS)


def test_every_command_loads_and_has_examples_in_its_help() -> None:
    ctx = click.Context(cli)
    commands = [cli.get_command(ctx, name) for name in COMMANDS]
    for command in list(commands):
        if isinstance(command, click.Group):
            commands.remove(command)
            commands.extend(command.commands.values())
    assert len(commands) >= len(COMMANDS)
    for command in commands:
        assert "Example" in (command.help or ""), command.name


def _group_raising(exc: BaseException) -> click.Group:
    @click.group(cls=GeosegGroup)
    def group() -> None:
        pass

    @group.command()
    def boom() -> None:
        raise exc

    return group


def test_library_errors_become_one_line_messages() -> None:
    runner = CliRunner()
    result = runner.invoke(
        _group_raising(InputError("a.tif: no such file; check the path")), ["boom"]
    )
    assert result.exit_code == 1
    assert result.output.strip() == "Error: a.tif: no such file; check the path"
    assert "Traceback" not in result.output

    result = runner.invoke(_group_raising(UsageError("--stride must be <= --window")), ["boom"])
    assert result.exit_code == 2
    assert "--stride must be <= --window" in result.output


def test_ctrl_c_is_a_clean_exit() -> None:
    result = CliRunner().invoke(_group_raising(KeyboardInterrupt()), ["boom"])
    assert result.exit_code == 130  # 128 + SIGINT, as shells report it
    assert "interrupted" in result.output


def test_log_lines_are_not_glued_to_a_progress_bar(monkeypatch) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    configure_logging(0)
    with progress(total=4, desc="windows") as bar:
        bar.update(2)
        logging.getLogger("geoseg_cli.inference.predict").warning("careful")
        bar.update(2)
    lines = re.split(r"[\r\n]", stderr.getvalue())
    assert "warning: careful" in lines  # a line of its own, not after the bar's text
    assert any(line.startswith("windows:  50%") for line in lines)
