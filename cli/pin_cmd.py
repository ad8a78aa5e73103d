"""``ckpt-ledger pin`` / ``unpin``: exempt a checkpoint from retention, or lift that."""

from __future__ import annotations

from pathlib import Path

import click

from cli.errors import EXIT_PROBLEM, CliError
from cli.options import open_read_only, run_dir_argument
from ledger import Ledger
from ledger.decisions import is_torn
from ledger.events import CheckpointPinned, CheckpointUnpinned
from ledger.statuses import CheckpointStatus

checkpoint_argument = click.argument("ref", metavar="ID")


def why_not_pinnable(view, ckpt) -> str | None:  # noqa: ANN001 - View, CheckpointState
    """Why a checkpoint cannot be pinned or aliased (``None``: it can)."""
    if ckpt.status == CheckpointStatus.DELETED:
        return "deleted"
    if ckpt.deletion_requested:
        return "being deleted"
    if ckpt.status == CheckpointStatus.ABORTED:
        return "aborted"
    if is_torn(view.state, ckpt):
        return "a torn save that will never be committed"
    return None


def _set_pin(run_dir: Path, ref: str, pinned: bool) -> None:
    # Validate on a read-only open, so a bad ID or a refused pin leaves every file untouched.
    with open_read_only(run_dir) as ro:
        view = ro.projection()
    ckpt = view.checkpoint(ref)  # unknown id -> CheckpointNotFoundError -> exit 1
    cid = ckpt.checkpoint_id
    if pinned and (why := why_not_pinnable(view, ckpt)) is not None:
        raise CliError(f"checkpoint {cid} is {why}; only a live checkpoint can be pinned "
                       "(see `ckpt-ledger inspect` for the committed ones)", EXIT_PROBLEM)
    if ckpt.pinned == pinned:
        click.echo(f"{cid} (step {ckpt.step}) is already {'pinned' if pinned else 'not pinned'}; nothing recorded")
        return
    event = CheckpointPinned(checkpoint_id=cid) if pinned else CheckpointUnpinned(checkpoint_id=cid)
    with Ledger.open(run_dir) as led:
        seq = led.append(event, epoch=None)  # an operator write, outside any attempt
    what = "pinned: retention will never delete it" if pinned else "unpinned: retention may delete it again"
    click.echo(f"{cid} (step {ckpt.step}) {what} (event {seq})")


@click.command("pin")
@run_dir_argument
@checkpoint_argument
def pin_command(run_dir: Path, ref: str) -> None:
    """Pin a checkpoint so that no retention policy or gc ever deletes it.

    ID is a checkpoint id, or `latest`, `best` or another alias (the checkpoint
    it points at now is pinned).

    \b
    Examples:
      ckpt-ledger pin runs/exp1 step000500-e2
      ckpt-ledger pin runs/exp1 best
    """
    _set_pin(run_dir, ref, True)


@click.command("unpin")
@run_dir_argument
@checkpoint_argument
def unpin_command(run_dir: Path, ref: str) -> None:
    """Lift a pin: the checkpoint is subject to the retention policy again.

    \b
    Examples:
      ckpt-ledger unpin runs/exp1 step000500-e2
    """
    _set_pin(run_dir, ref, False)
