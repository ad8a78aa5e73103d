"""``ckpt-ledger alias`` / ``unalias``: give a checkpoint a name people use (protected from retention)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from cli.errors import EXIT_PROBLEM, EXIT_USAGE, CliError
from cli.options import open_read_only, run_dir_argument
from cli.pin_cmd import why_not_pinnable
from ledger import Ledger
from ledger.decisions import SYSTEM_ALIASES
from ledger.events import AliasPromoted, AliasRemoved

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


def _check_name(name: str, checkpoints) -> None:  # noqa: ANN001 - the view's checkpoint dict
    if name in SYSTEM_ALIASES:
        raise CliError(f"alias {name!r} is kept by the ledger itself (it follows the run); pick another name", EXIT_USAGE)
    if not _NAME.match(name):
        raise CliError(f"alias {name!r} is not a valid name: start with a letter, then letters, digits, '.', '_' or "
                       "'-' (at most 64)", EXIT_USAGE)
    if name in checkpoints:
        raise CliError(f"alias {name!r} is also a checkpoint id; pick a name that is not", EXIT_USAGE)


@click.command("alias")
@run_dir_argument
@click.argument("name", metavar="NAME")
@click.argument("ref", metavar="ID")
def alias_command(run_dir: Path, name: str, ref: str) -> None:
    """Point alias NAME at a checkpoint (recorded as alias.promoted; moving it keeps the history).

    ID is a checkpoint id, `latest`, `best` or another alias (the checkpoint it points
    at now). An aliased checkpoint is never deleted by retention or gc; `export
    --checkpoint NAME` and `train --resume NAME` accept the name.

    \b
    Examples:
      ckpt-ledger alias runs/exp1 golden step000300-e2
      ckpt-ledger alias runs/exp1 before-spike best
    """
    with open_read_only(run_dir) as ro:  # validate first: a refused alias leaves every file untouched
        view = ro.projection()
    _check_name(name, view.checkpoints)
    ckpt = view.checkpoint(ref)
    if (why := why_not_pinnable(view, ckpt)) is not None:
        raise CliError(f"checkpoint {ckpt.checkpoint_id} is {why}; only a live checkpoint can be aliased", EXIT_PROBLEM)
    if view.state.aliases.get(name) == ckpt.checkpoint_id:
        click.echo(f"{name} already points at {ckpt.checkpoint_id} (step {ckpt.step}); nothing recorded")
        return
    before = view.state.aliases.get(name)
    with Ledger.open(run_dir) as led:
        seq = led.append(AliasPromoted(alias=name, checkpoint_id=ckpt.checkpoint_id, reason="user"), epoch=None)
    moved = f" (was {before})" if before else ""
    click.echo(f"{name} -> {ckpt.checkpoint_id} (step {ckpt.step}){moved}; retention keeps it (event {seq})")


@click.command("unalias")
@run_dir_argument
@click.argument("name", metavar="NAME")
def unalias_command(run_dir: Path, name: str) -> None:
    """Remove a user alias (recorded as alias.removed); its checkpoint is subject to retention again.

    \b
    Examples:
      ckpt-ledger unalias runs/exp1 golden
    """
    with open_read_only(run_dir) as ro:
        view = ro.projection()
    if name in SYSTEM_ALIASES:
        raise CliError(f"alias {name!r} is kept by the ledger itself and cannot be removed", EXIT_USAGE)
    target = view.state.aliases.get(name)
    if target is None:
        known = ", ".join(sorted(a for a in view.state.aliases if a not in SYSTEM_ALIASES)) or "none"
        raise CliError(f"no alias {name!r} in this run (user aliases: {known})", EXIT_PROBLEM)
    with Ledger.open(run_dir) as led:
        seq = led.append(AliasRemoved(alias=name, reason="user"), epoch=None)
    click.echo(f"removed alias {name} (was {target}) (event {seq})")
