"""cdpctl's start-up: a command imports what it uses only. Every command (and every test calling the CLI)
once paid for the bus client (nats, aiohttp), telemetry and cryptography before doing anything."""

from __future__ import annotations

import json
import subprocess
import sys

import click
from click.testing import CliRunner

from cdpctl.cli import COMMANDS, MODELS_COMMANDS, main, models

HEAVY = ("nats", "aiohttp", "cdp_kit.bus", "cdp_kit.telemetry", "cryptography")


def _imported_for(*command: str) -> dict[str, bool]:
    """Which heavy modules a fresh interpreter holds once click has found `command` (as `cdpctl` would)."""
    code = f"""
import json, sys
from cdpctl.cli import main
ctx = main.make_context("cdpctl", ["--home", "unused"])
group, found = main, None
for name in {list(command)!r}:
    found = group.get_command(ctx, name)
    group = found
assert found is not None
print(json.dumps({{m: m in sys.modules for m in {list(HEAVY)!r}}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_commands_that_do_not_use_the_bus_do_not_import_it():
    for command in (("send",), ("profile",), ("status",), ("segments",), ("models", "train"), ("journey",)):
        imported = _imported_for(*command)
        assert not any(imported.values()), (command, imported)


def test_a_bus_command_still_gets_the_bus():
    assert _imported_for("dlq")["nats"]


def test_every_named_command_is_found_under_its_name():
    for group, names in ((main, COMMANDS), (models, MODELS_COMMANDS)):
        ctx = click.Context(group)
        for name in names:
            command = group.get_command(ctx, name)
            assert command is not None and command.name == name
        assert set(names) <= set(group.list_commands(ctx))


def test_help_lists_every_command():
    shown = CliRunner().invoke(main, ["--help"]).output
    for name in (*COMMANDS, "send", "profile", "models", "segment", "segments"):
        assert f"  {name} " in shown, name
