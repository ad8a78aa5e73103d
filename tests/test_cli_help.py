"""Every command documents itself with at least one runnable example."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from cli.main import cli

COMMANDS = sorted(cli.commands)


def test_the_issue_commands_are_registered():
    assert {"inspect", "replay", "audit", "gc", "tail", "pin", "unpin", "timeline"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_an_example(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert re.search(r"^\s*Examples?:\s*$", result.output, re.M), f"`{name} --help` has no Example(s): section"
    examples = re.findall(rf"^\s+ckpt-ledger {re.escape(name)}\b.*$", result.output, re.M)
    assert examples, f"`{name} --help` shows no `ckpt-ledger {name} ...` example line"


def test_group_help_shows_an_example():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0 and re.search(r"^\s+ckpt-ledger \w+", result.output, re.M)
