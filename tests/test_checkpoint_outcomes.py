"""``trainer.checkpoint_outcomes.attempt_ending``: how a ``CheckpointManager`` attempt ends, as a pure decision."""

from __future__ import annotations

import signal

import pytest

from ledger import AttemptStatus
from trainer import SaveResult, SaveStatus
from trainer.checkpoint_outcomes import attempt_ending, fenced_ending, fenced_result
from trainer.errors import EXIT_PREEMPTED, EXIT_PROBLEM

SIGTERM = int(signal.SIGTERM)


def saved(step: int, status: SaveStatus, reason: str | None = None) -> SaveResult:
    return SaveResult(f"step{step:06d}-e1", step, status, reason)


def test_a_loop_that_ran_out_completes():
    ending = attempt_ending(None, saved(10, SaveStatus.COMMITTED), 10, 0)
    assert (ending.status, ending.exit_code, ending.message, ending.recorded) == ("completed", 0, None, True)
    assert not ending.final  # fencing learned while recording it still turns it into fenced


def test_a_failed_checkpoint_at_the_last_step_fails_the_attempt():
    ending = attempt_ending(None, saved(10, SaveStatus.ABORTED, "disk full"), 10, 0)
    assert (ending.status, ending.exit_code) == (AttemptStatus.FAILED, EXIT_PROBLEM)
    assert ending.message == "the checkpoint at the last step 10 failed: disk full"
    # An aborted save before the last step does not: the last step was simply not saved.
    assert attempt_ending(None, saved(8, SaveStatus.ABORTED, "disk full"), 10, 0).status == "completed"


def test_preemption_after_saving_the_last_step_exits_75():
    ending = attempt_ending((AttemptStatus.PREEMPTED, SIGTERM), saved(7, SaveStatus.COMMITTED), 7, 0)
    assert (ending.status, ending.exit_code, ending.signal_name) == ("preempted", EXIT_PREEMPTED, "SIGTERM")
    assert ending.message == "preempted by SIGTERM; state saved at step 7" and ending.warning is None
    assert ending.notice == f"preempted by SIGTERM: exiting {EXIT_PREEMPTED} (requeue me)"


def test_preemption_without_a_checkpoint_of_the_last_step_warns_where_a_restart_resumes():
    ending = attempt_ending((AttemptStatus.PREEMPTED, SIGTERM), None, 7, 4)
    assert ending.status == "preempted" and ending.message == "preempted by SIGTERM; state saved at step 4"
    assert ending.warning == "preempted at step 7 without a checkpoint of it: a restart resumes from step 4"


def test_preemption_whose_checkpoint_failed_is_a_failure_that_fencing_does_not_override():
    ending = attempt_ending((AttemptStatus.PREEMPTED, SIGTERM), saved(7, SaveStatus.ABORTED, "rank 1 died"), 7, 0)
    assert (ending.status, ending.exit_code, ending.final) == ("failed", EXIT_PROBLEM, True)
    assert ending.message == "preempted by SIGTERM at step 7 but the checkpoint failed: rank 1 died"


@pytest.mark.parametrize("last", [None, saved(6, SaveStatus.COMMITTED)])
def test_a_fenced_attempt_records_nothing_and_exits_1(last):
    ending = attempt_ending((AttemptStatus.FENCED, 3), last, 6, 0)
    assert ending == fenced_ending(3)
    assert (ending.status, ending.exit_code, ending.recorded, ending.final) == ("fenced", EXIT_PROBLEM, False, True)
    assert ending.message.startswith("fenced by epoch 3: a newer attempt took over this run")
    assert fenced_result(6, 3) == SaveResult(None, 6, "fenced", "fenced by epoch 3")
