"""What a ``CheckpointManager`` reports: each save's :class:`SaveResult`, and how the attempt ended.

:func:`attempt_ending` is the decision ``close()`` records (``attempt.ended``'s reason),
returns (the exit code: 0, 75 "requeue me", 1) and tells the user, as a pure function
of how the loop stopped and what the last save did. Every rank computes the same one
from the same inputs; only rank 0's recorder records it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from ledger.statuses import AttemptStatus, StrEnum
from trainer.errors import EXIT_PREEMPTED, EXIT_PROBLEM


class SaveStatus(StrEnum):
    """How one :meth:`~trainer.CheckpointManager.save` ended (its :attr:`SaveResult.status`)."""

    COMMITTED = "committed"
    """Durable on every rank and recorded as ``checkpoint.committed``."""
    IN_FLIGHT = "in_flight"
    """Being written in the background; a later call learns how it ended."""
    ABORTED = "aborted"
    """Recorded as ``checkpoint.aborted`` (the reason says why)."""
    FENCED = "fenced"
    """Not taken: a newer attempt owns the run."""


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What :meth:`CheckpointManager.save` did, identical on every rank."""

    checkpoint_id: str | None
    step: int
    status: str
    """A :class:`SaveStatus`: ``committed``, ``in_flight`` (being written in the background), ``aborted`` or
    ``fenced``."""
    reason: str | None = None


def fenced_result(step: int, fenced_by: int | None, checkpoint_id: str | None = None) -> SaveResult:
    """The result of a save refused because epoch ``fenced_by`` took over the run."""
    return SaveResult(checkpoint_id, step, SaveStatus.FENCED, f"fenced by epoch {fenced_by}")


#: Why the loop stopped early: ``(PREEMPTED, signal number)`` or ``(FENCED, the newer epoch)``.
Stop = tuple[AttemptStatus, int]


@dataclass(frozen=True, slots=True)
class AttemptEnding:
    """How an attempt ended, as the manager reports it."""

    status: AttemptStatus
    """The manager's :attr:`~trainer.CheckpointManager.status`, and the ``attempt.ended`` reason recorded."""
    exit_code: int
    message: str | None = None
    """One line for the user when the attempt did not complete."""
    recorded: bool = True
    """Whether ``attempt.ended`` is recorded (a fenced attempt's appends are refused: the recorder did it)."""
    signal_name: str | None = None
    """The preemption signal, recorded as ``preemption.signalled`` before ``attempt.ended``."""
    warning: str | None = None
    """Said as an error before the end is recorded."""
    notice: str | None = None
    """Said after it is recorded."""
    final: bool = False
    """``True``: fencing that rank 0 learns while recording the end does not turn this into ``fenced``."""


def fenced_ending(fenced_by: int | None) -> AttemptEnding:
    """A newer attempt (epoch ``fenced_by``) took over: exit 1, and the job is not restarted."""
    message = f"fenced by epoch {fenced_by}: a newer attempt took over this run; this job stops (not restarted)"
    # A progress line: stderr is left to whoever reports the exit (the CLI does).
    return AttemptEnding(AttemptStatus.FENCED, EXIT_PROBLEM, message, recorded=False, notice=message, final=True)


def attempt_ending(stop: Stop | None, last_save: SaveResult | None, last_step: int,
                   restored_step: int | None) -> AttemptEnding:
    """How an attempt that reached ``last_step`` ends (``close()`` without an error propagating)."""
    if stop is not None and stop[0] == AttemptStatus.FENCED:
        return fenced_ending(stop[1])
    if stop is not None and stop[0] == AttemptStatus.PREEMPTED:
        name = signal.Signals(stop[1]).name
        if last_save is not None and last_save.step == last_step and last_save.status != SaveStatus.COMMITTED:
            return AttemptEnding(AttemptStatus.FAILED, EXIT_PROBLEM, final=True, message=(
                f"preempted by {name} at step {last_step} but the checkpoint failed: {last_save.reason}"))
        saved_step = last_save.step if last_save else restored_step
        warning = None if saved_step == last_step else (
            f"preempted at step {last_step} without a checkpoint of it: a restart resumes from step {saved_step}")
        return AttemptEnding(AttemptStatus.PREEMPTED, EXIT_PREEMPTED, f"preempted by {name}; state saved at step "
                             f"{saved_step}", signal_name=name, warning=warning,
                             notice=f"preempted by {name}: exiting {EXIT_PREEMPTED} (requeue me)")
    if last_save is not None and last_save.step == last_step and last_save.status == SaveStatus.ABORTED:
        # The last step's checkpoint failed: "completed" would promise a checkpoint there is not.
        return AttemptEnding(AttemptStatus.FAILED, EXIT_PROBLEM,
                             f"the checkpoint at the last step {last_step} failed: {last_save.reason}")
    return AttemptEnding(AttemptStatus.COMPLETED, 0)
