"""``ckpt-ledger tail``: the newest events of a run, and with ``--follow`` the ones a live job appends."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import click
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from cli.options import json_option, open_read_only, run_dir_argument
from cli.event_lines import format_event
from ledger import LEDGER_FILE, Ledger

#: Re-read the log at least this often even if no file event arrived (e.g. a network file system).
FALLBACK_S = 3.0

_WATCHED = {LEDGER_FILE, f"{LEDGER_FILE}-wal"}


class _LedgerChanged(FileSystemEventHandler):
    """Wakes the follower when ledger.db or its -wal changes (appends land in the -wal first)."""

    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        names = {os.path.basename(str(event.src_path)), os.path.basename(str(getattr(event, "dest_path", "") or ""))}
        if names & _WATCHED:
            self._wake.set()


def _print_after(led: Ledger, after_seq: int, as_json: bool) -> int:
    """Print every event past ``after_seq``; return the last sequence number printed."""
    for stored in led.iter_events(after=after_seq):
        click.echo(format_event(stored, as_json))
        after_seq = stored.seq
    return after_seq


def follow(led: Ledger, after_seq: int, as_json: bool) -> None:
    """Print new events as they are appended, until interrupted. Sleeps between file-system events
    (a run in a database: between the server's notifications of committed appends)."""
    wait_for_append = getattr(led.store, "wait_for_append", None)
    if wait_for_append is not None:
        while True:
            wait_for_append(FALLBACK_S)
            after_seq = _print_after(led, after_seq, as_json)
    wake = threading.Event()
    observer = Observer()
    observer.schedule(_LedgerChanged(wake), str(led.run_dir), recursive=False)
    observer.daemon = True
    observer.start()
    try:
        while True:
            wake.wait(FALLBACK_S)
            wake.clear()  # before reading: a change during the read wakes the next round
            after_seq = _print_after(led, after_seq, as_json)
    finally:
        observer.stop()
        observer.join(timeout=2.0)


@click.command("tail")
@run_dir_argument
@click.option("-f", "--follow", "follow_", is_flag=True, help="Keep printing events as a live job appends them (Ctrl-C stops).")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=10, show_default=True, metavar="N",
              help="How many of the newest events to print first.")
@json_option
def tail_command(run_dir: Path, follow_: bool, lines: int, as_json: bool) -> None:
    """Print the newest events of a run (same format as `replay`); --follow keeps watching.

    Read-only: works while a training job is writing, and creates no file.

    \b
    Examples:
      ckpt-ledger tail runs/exp1
      ckpt-ledger tail runs/exp1 --follow
      ckpt-ledger tail runs/exp1 -f -n 0 --json | jq -c 'select(.tag == "checkpoint.committed")'
    """
    with open_read_only(run_dir) as led:
        try:
            start = max(0, led.max_seq() - lines)
            after_seq = _print_after(led, start, as_json)
            if follow_:
                follow(led, after_seq, as_json)
        except KeyboardInterrupt:
            return  # Ctrl-C is how one stops following: a normal exit
