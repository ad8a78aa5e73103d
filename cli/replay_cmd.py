"""``ckpt-ledger replay``: the events of a run, in log order."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import click
import msgspec

from cli.options import json_option, open_read_only, run_dir_argument, seq_type
from ledger import Ledger
from ledger.events import EVENT_TYPES
from ledger.store import StoredEvent

#: Sequence numbers read per transaction when streaming the log.
PAGE = 2000


def event_fields(stored: StoredEvent) -> dict[str, Any]:
    """An event's own fields as plain data (without its tag)."""
    fields = msgspec.to_builtins(stored.event)
    fields.pop("tag", None)
    return fields


def event_to_json(stored: StoredEvent) -> dict[str, Any]:
    """One line of ``replay --json``: the envelope, then the event's fields."""
    return {
        "seq": stored.seq,
        "tag": stored.tag,
        "epoch": stored.epoch,
        "event_id": stored.event_id,
        "recorded_at": stored.recorded_at,
        "schema_version": stored.schema_version,
        **event_fields(stored),
    }


def event_to_line(stored: StoredEvent) -> str:
    """One line of human ``replay``/``tail`` output."""
    when = datetime.fromtimestamp(stored.recorded_at, tz=timezone.utc).strftime("%H:%M:%S")
    fields = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in event_fields(stored).items())
    return f"{stored.seq:>7}  {when}  e{stored.epoch:<3} {stored.tag:<30} {fields}"


def format_event(stored: StoredEvent, as_json: bool) -> str:
    """One output line of ``replay``/``tail``, human or JSON."""
    return json.dumps(event_to_json(stored)) if as_json else event_to_line(stored)


def stream_events(led: Ledger, *, after_seq: int = 0, until_seq: int | None = None,
                  tags: list[str] | None = None, page: int = PAGE) -> Iterator[StoredEvent]:
    """Events in log order, read ``page`` sequence numbers at a time.

    A big log is never held in memory, and the first line prints at once (so
    ``replay | head -1`` returns immediately). The log is append-only, so pages
    read in separate transactions still form one consistent prefix.
    """
    newest = led.max_seq()
    end = newest if until_seq is None else min(until_seq, newest)
    while after_seq < end:
        upto = min(after_seq + page, end)
        yield from led.events(after_seq=after_seq, until_seq=upto, tags=tags)
        after_seq = upto


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
        for stored in stream_events(led, after_seq=(from_seq - 1) if from_seq else 0, until_seq=until_seq, tags=tags):
            click.echo(format_event(stored, as_json))
