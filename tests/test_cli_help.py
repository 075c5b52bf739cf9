"""Every command teaches: it has help, takes --config, and the README names its group."""

from __future__ import annotations

from pathlib import Path

import click
from click.testing import CliRunner

from smtp_guard.cli.main import main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = []
    for name, command in sorted(group.commands.items()):
        path = (*prefix, name)
        found.append((path, command))
        if isinstance(command, click.Group):
            found += _commands(command, path)
    return found


def test_every_command_has_help_and_takes_config() -> None:
    runner = CliRunner()
    for path, command in _commands(main):
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert (command.help or "").strip(), f"smtp-guard {' '.join(path)} has no help text"
        # These read no config: three make a secret and print what to configure, one prints the
        # shipped file.
        if not isinstance(command, click.Group) and path not in (("hash-password",), ("config", "example"),
                                                                 ("admin", "token", "create"), ("dkim", "keygen")):
            assert "--config" in result.output, f"smtp-guard {' '.join(path)} does not take --config"


def test_every_command_group_is_in_the_readme() -> None:
    for path, _ in _commands(main):
        if len(path) == 1:
            assert f"smtp-guard {path[0]}" in README, f"README does not mention smtp-guard {path[0]}"
