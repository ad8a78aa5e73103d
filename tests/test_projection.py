"""Projection and decisions on hand-built logs: resume, latest, best (late metrics), goodput, time travel."""

from __future__ import annotations

import pytest

from ledger import CheckpointNotFoundError, IncompleteCheckpointError, Ledger
from ledger.events import (
    AliasPromoted,
    AttemptEnded,
    CheckpointPinned,
    CheckpointUnpinned,
    MetricRecorded,
    ShardWritten,
    StepCompleted,
)


def checkpoint(led: Ledger, cid: str, step: int, epoch: int, ranks=(0,), commit=True) -> None:
    """Begin, record one shard per rank, and (optionally) commit a checkpoint."""
    led.begin_checkpoint(checkpoint_id=cid, step=step, ranks=list(ranks), world_size=len(ranks), stack="ddp", epoch=epoch)
    shards = []
    for rank in ranks:
        info = led.blobs.write(f"{led.blobs.checkpoint_dir(cid, epoch)}/rank{rank}.bin", f"{cid}-{rank}".encode())
        shards.append(ShardWritten(checkpoint_id=cid, rank=rank, location=info.location, bytes=info.bytes,
                                   hash=info.hash, codec=info.codec))
    led.record_shards(cid, shards, epoch=epoch)
    if commit:
        led.commit_checkpoint(cid, epoch=epoch)


def steps(led: Ledger, first: int, last: int, epoch: int) -> None:
    for step in range(first, last + 1):
        led.append(StepCompleted(step=step, metrics={"loss": 1.0 / step}), epoch=epoch)


@pytest.fixture
def led(run_dir):
    with Ledger.open(run_dir) as handle:
        handle.start_run(run_id="r", config={})
        yield handle


def test_empty_ledger_projects_to_nothing(led):
    view = led.projection()
    assert (view.resume, view.latest, view.best, view.last_step, view.goodput) == (None, None, None, None, 1.0)
    assert view.run.run_id == "r"


def test_resume_is_highest_step_latest_is_newest_commit(led):
    a = led.begin_attempt().epoch
    checkpoint(led, "s20", 20, a)
    checkpoint(led, "s10", 10, a)  # committed later, lower step (e.g. an eval-triggered save of an older step)
    checkpoint(led, "s30", 30, a, commit=False)  # in flight: never resumed from
    view = led.projection()
    assert view.resume.checkpoint_id == "s20"
    assert view.latest.checkpoint_id == "s10"
    assert [c.checkpoint_id for c in view.resume_candidates()] == ["s20", "s10"]
    assert view.checkpoints["s30"].status == "in_flight"


def test_commit_with_a_missing_rank_is_refused_and_writes_nothing(led):
    a = led.begin_attempt().epoch
    checkpoint(led, "c", 5, a, ranks=(0, 1), commit=False)
    led.begin_checkpoint(checkpoint_id="d", step=6, ranks=[0, 1], world_size=2, stack="ddp", epoch=a)
    before = led.max_seq()
    with pytest.raises(IncompleteCheckpointError, match=r"rank\(s\) \[0, 1\]"):
        led.commit_checkpoint("d", epoch=a)
    with pytest.raises(IncompleteCheckpointError, match="never begun"):
        led.commit_checkpoint("nope", epoch=a)
    assert led.max_seq() == before
    led.commit_checkpoint("c", epoch=a)
    assert led.projection().resume.checkpoint_id == "c"


def test_commit_after_abort_is_refused(led):
    a = led.begin_attempt().epoch
    checkpoint(led, "c", 5, a, commit=False)
    led.abort_checkpoint("c", "rank died", epoch=a)
    with pytest.raises(IncompleteCheckpointError, match="checkpoint.aborted"):
        led.commit_checkpoint("c", epoch=a)
    assert led.projection().checkpoints["c"].status == "aborted"


def test_pinning_or_aliasing_an_in_flight_checkpoint_does_not_block_its_commit(led):
    a = led.begin_attempt().epoch
    checkpoint(led, "c", 5, a, commit=False)
    led.append(CheckpointPinned(checkpoint_id="c"))
    led.append(CheckpointUnpinned(checkpoint_id="c"))
    led.append(AliasPromoted(alias="candidate", checkpoint_id="c"))
    led.append(MetricRecorded(name="eval_loss", value=1.0, step=5, checkpoint_id="c"), epoch=a)
    led.commit_checkpoint("c", epoch=a)
    assert led.projection().resume.checkpoint_id == "c"


def test_corruption_moves_resume_to_the_previous_good_checkpoint(led):
    a = led.begin_attempt().epoch
    checkpoint(led, "s10", 10, a)
    checkpoint(led, "s20", 20, a)
    led.report_corruption("s20", "blobs/s20/e1/rank0.bin", "blake2b:00", None, epoch=a)
    view = led.projection()
    assert view.checkpoints["s20"].status == "corrupt"
    assert (view.resume.checkpoint_id, view.latest.checkpoint_id) == ("s10", "s10")


def test_late_metric_still_counts_for_best(led):
    a = led.begin_attempt().epoch
    for cid, step in (("s10", 10), ("s20", 20), ("s30", 30)):
        checkpoint(led, cid, step, a)
    led.append(MetricRecorded(name="eval_loss", value=0.5, step=20, checkpoint_id="s20"), epoch=a)
    led.append(MetricRecorded(name="eval_loss", value=0.7, step=30, checkpoint_id="s30"), epoch=a)
    assert led.projection().best.checkpoint_id == "s20"
    # The eval of step 10 finishes last, after two later checkpoints, and is the best of all.
    led.append(MetricRecorded(name="eval_loss", value=0.1, step=10, checkpoint_id="s10"), epoch=a)
    best = led.projection().best
    assert (best.checkpoint_id, best.metric, best.value) == ("s10", "eval_loss", 0.1)
    # ... also when recorded by a later attempt, by step only (no checkpoint id).
    b = led.begin_attempt(resumed_from="s30").epoch
    checkpoint(led, "s40", 40, b)
    checkpoint(led, "s50", 50, b)
    led.append(MetricRecorded(name="eval_loss", value=0.05, step=40), epoch=b)
    assert led.projection().best.checkpoint_id == "s40"
    # A value recorded against a checkpoint wins over one recorded only at its step.
    led.append(MetricRecorded(name="eval_loss", value=0.01, step=20), epoch=b)
    assert led.projection().best.checkpoint_id == "s40"


def test_best_rule_from_config_and_override(run_dir):
    with Ledger.open(run_dir) as led:
        led.start_run(run_id="r", config={"best_metric": "acc", "best_mode": "max"})
        a = led.begin_attempt().epoch
        checkpoint(led, "x", 1, a)
        checkpoint(led, "y", 2, a)
        led.append(MetricRecorded(name="acc", value=0.9, step=1, checkpoint_id="x"), epoch=a)
        led.append(MetricRecorded(name="acc", value=0.8, step=2, checkpoint_id="y"), epoch=a)
        assert led.projection().best.checkpoint_id == "x"
        from ledger import BestRule
        assert led.projection(best_rule=BestRule("acc", "min")).best.checkpoint_id == "y"


def test_deleted_checkpoint_is_not_best_latest_or_resume(led):
    a = led.begin_attempt().epoch
    checkpoint(led, "s10", 10, a)
    checkpoint(led, "s20", 20, a)
    led.append(MetricRecorded(name="eval_loss", value=0.1, step=20, checkpoint_id="s20"), epoch=a)
    from ledger.events import CheckpointDeleted, CheckpointDeletionRequested
    led.append(CheckpointDeletionRequested(checkpoint_id="s20", reason="test"))
    view = led.projection()
    assert (view.resume.checkpoint_id, view.latest.checkpoint_id, view.best) == ("s10", "s10", None)
    led.append(CheckpointDeleted(checkpoint_id="s20"))
    assert led.projection().checkpoints["s20"].status == "deleted"
    with pytest.raises(CheckpointNotFoundError):
        led.projection().checkpoint("best")


def test_goodput_counts_work_lost_to_a_restart(led):
    a = led.begin_attempt().epoch
    steps(led, 1, 10, a)
    checkpoint(led, "s10", 10, a)
    steps(led, 11, 16, a)  # 6 steps of work after the last checkpoint: lost when the job dies
    b = led.begin_attempt(resumed_from="s10").epoch
    steps(led, 11, 20, b)
    view = led.projection()
    assert (view.state.steps_run, view.state.steps_lost) == (26, 6)
    assert view.goodput == pytest.approx(20 / 26)
    assert [x.status for x in view.attempts] == ["crashed", "running"]
    assert view.last_step == 20
    led.append(AttemptEnded(epoch=b, reason="completed", last_step=20), epoch=b)
    assert led.projection().attempts[-1].status == "completed"


def test_time_travel(led):
    a = led.begin_attempt().epoch
    checkpoint(led, "s10", 10, a)
    seq_after_s10 = led.max_seq()
    checkpoint(led, "s20", 20, a)
    corrupt_seq = led.report_corruption("s20", "x", None, None, epoch=a)
    now = led.projection()
    then = led.projection(at=seq_after_s10)
    assert then.seq == seq_after_s10 and "s20" not in then.checkpoints
    assert then.resume.checkpoint_id == "s10" == now.resume.checkpoint_id
    before_corruption = led.projection(at=corrupt_seq - 1)
    assert before_corruption.resume.checkpoint_id == "s20"
    assert led.projection(at=0).checkpoints == {}
    assert led.projection(at=10**9).seq == now.seq
    with pytest.raises(ValueError):
        led.projection(at=-1)
    # Time travel is the same from a read-only handle, and does not disturb the writer's cache.
    ro = Ledger.open(led.run_dir, read_only=True)
    assert ro.projection(at=seq_after_s10).resume.checkpoint_id == "s10"
    assert led.projection().resume.checkpoint_id == "s10"


def test_anomalies_are_kept_not_raised(led):
    a = led.begin_attempt().epoch
    led.append(ShardWritten(checkpoint_id="ghost", rank=0, location="x", bytes=1, hash="blake2b:00"), epoch=a)
    led.append(AliasPromoted(alias="golden", checkpoint_id="ghost"), epoch=a)
    anomalies = led.projection().anomalies
    assert len(anomalies) == 2 and all("ghost" in a for a in anomalies)
    assert "golden" not in led.projection().state.aliases


def test_view_to_dict_has_the_contract_fields(led):
    a = led.begin_attempt(job_id="j").epoch
    checkpoint(led, "s1", 1, a)
    out = led.projection().to_dict()
    for key in ("run_id", "latest", "best", "resume", "last_step", "attempts", "checkpoints", "goodput"):
        assert key in out
    assert out["resume"] == {"checkpoint_id": "s1", "step": 1}
    assert {"checkpoint_id", "step", "status", "bytes", "shards", "world_size", "stack"} <= set(out["checkpoints"][0])
    assert {"epoch", "status", "reason", "started_at", "ended_at", "resumed_from", "last_step", "job_id"} <= set(out["attempts"][0])
