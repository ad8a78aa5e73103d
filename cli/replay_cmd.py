"""``ckpt-ledger replay``: the events of a run, in log order."""

from __future__ import annotations

from pathlib import Path

import click

from cli.event_lines import format_event
from cli.options import json_option, open_read_only, run_dir_argument, seq_type
from ledger.events import EVENT_TYPES


def check_kinds(kinds: tuple[str, ...]) -> list[str] | None:
    """Validate ``--kind`` values against the known tags."""
    unknown = [k for k in kinds if k not in EVENT_TYPES]
    if unknown:
        raise click.BadParameter(
            f"unknown event tag(s) {', '.join(unknown)}; valid tags: {', '.join(EVENT_TYPES)}", param_hint="--kind"
        )
    return list(kinds) or None


@click.command("replay")
@run_dir_argument
@json_option
@click.option("--from", "from_seq", type=seq_type, default=None, metavar="SEQ", help="First sequence number to print.")
@click.option("--until", "until_seq", type=seq_type, default=None, metavar="SEQ", help="Last sequence number to print.")
@click.option("--kind", "kinds", multiple=True, metavar="TAG", help="Only events with this tag (repeatable).")
def replay_command(run_dir: Path, as_json: bool, from_seq: int | None, until_seq: int | None, kinds: tuple[str, ...]) -> None:
    """Print a run's events in log order, one per line.

    \b
    Examples:
      ckpt-ledger replay runs/exp1
      ckpt-ledger replay runs/exp1 --kind checkpoint.committed --kind attempt.ended
      ckpt-ledger replay runs/exp1 --json --from 100 --until 200
    """
    if from_seq is not None and until_seq is not None and from_seq > until_seq:
        raise click.BadParameter(f"--from {from_seq} is after --until {until_seq}; swap them", param_hint="--from")
    tags = check_kinds(kinds)
    with open_read_only(run_dir) as led:
        for stored in led.iter_events(after=(from_seq - 1) if from_seq else 0, until=until_seq, tags=tags):
            click.echo(format_event(stored, as_json))
