"""``ckpt-ledger end-attempt``: record that an attempt whose processes are gone has ended."""

from __future__ import annotations

import time
from pathlib import Path

import click

from cli.errors import EXIT_PROBLEM, CliError
from cli.options import open_read_only, run_dir_argument
from ledger import Ledger
from ledger.events import AttemptEnded
from ledger.statuses import AttemptStatus

#: An attempt that is the newest and appended within this many seconds may still be alive: refused.
#: The trainer appends at least every ``log_every`` steps and at every checkpoint, so 5 minutes
#: of silence is far longer than a healthy job stays quiet; raise it for very slow steps.
DEFAULT_GRACE_S = 300.0


@click.command("end-attempt")
@run_dir_argument
@click.argument("epoch", metavar="EPOCH", type=click.IntRange(min=1))
# The values, not the members: click matches an Enum choice by member name (``CRASHED``).
@click.option("--reason", type=click.Choice((AttemptStatus.CRASHED.value, AttemptStatus.FAILED.value)), required=True,
              help="What happened to it (recorded in attempt.ended).")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=DEFAULT_GRACE_S, show_default=True,
              metavar="SECONDS", help="Refuse while the newest attempt appended within this many seconds.")
def end_attempt_command(run_dir: Path, epoch: int, reason: str, grace_s: float) -> None:
    """Record that attempt EPOCH ended (its processes are gone) so gc may clean up after it.

    Until then an attempt without attempt.ended might still be writing, so its
    in-flight save and files are left alone; afterwards `ckpt-ledger gc` removes
    them. Refused (exit 1) when EPOCH is the newest attempt and it appended within
    --grace seconds: it may be alive (a newer attempt fences it anyway). This does not
    fence: if the job was only slow, its later commits of a removed save are refused.

    \b
    Examples:
      ckpt-ledger end-attempt runs/exp1 3 --reason crashed
      ckpt-ledger end-attempt runs/exp1 3 --reason crashed && ckpt-ledger gc runs/exp1
    """
    with open_read_only(run_dir) as ro:
        view = ro.projection()
        attempt = view.state.attempts.get(epoch)
        if attempt is None:
            known = ", ".join(str(a.epoch) for a in view.attempts) or "none"
            raise CliError(f"no attempt {epoch} in this run (attempts: {known}); see `ckpt-ledger inspect`", EXIT_PROBLEM)
        if attempt.ended_seq is not None:
            raise CliError(f"attempt {epoch} already ended ({attempt.status}, event {attempt.ended_seq}); "
                           "nothing to record", EXIT_PROBLEM)
        last = ro.events(after_seq=attempt.last_seq - 1, until_seq=attempt.last_seq)
        heard = last[0].recorded_at if last else attempt.started_at
    quiet_s = time.time() - heard
    if epoch == view.state.current_epoch and quiet_s < grace_s:
        raise CliError(f"attempt {epoch} is the newest and appended {quiet_s:.0f} s ago (grace {grace_s:.0f} s): it "
                       f"may still be running; check its processes, then wait or pass --grace 0", EXIT_PROBLEM)
    with Ledger.open(run_dir) as led:
        seq = led.append(AttemptEnded(epoch=epoch, reason=reason, last_step=attempt.last_step), epoch=None,
                         event_id=f"attempt.ended:e{epoch}:{reason}")
    click.echo(f"attempt {epoch} recorded as {reason} at step {attempt.last_step} (event {seq}); "
               f"`ckpt-ledger gc {run_dir}` now removes its unfinished save and files")
