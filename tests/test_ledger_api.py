"""End-to-end use of the public ``ledger`` API: a run with attempts, checkpoints, retention and a zombie."""

from __future__ import annotations

import os

import pytest

from ledger import CheckpointNotFoundError, FencedError, IncompleteCheckpointError, Ledger, RetentionPolicy
from ledger.events import AttemptEnded, MetricRecorded, ShardWritten, StepCompleted


def _checkpoint(led: Ledger, epoch: int, step: int, ranks=(0, 1), skip_rank: int | None = None) -> str:
    cid = f"ckpt-{step:06d}-e{epoch}"
    led.begin_checkpoint(checkpoint_id=cid, step=step, ranks=list(ranks), world_size=len(ranks), stack="ddp", epoch=epoch)
    shards = []
    for rank in ranks:
        if rank == skip_rank:
            continue
        info = led.blobs.write(f"{led.blobs.checkpoint_dir(cid, epoch)}/rank{rank}.bin", os.urandom(64), codec="zstd")
        shards.append(ShardWritten(checkpoint_id=cid, rank=rank, location=info.location, bytes=info.bytes,
                                   hash=info.hash, codec=info.codec))
    led.record_shards(cid, shards, epoch=epoch)
    return cid


def test_run_lifecycle_decisions(tmp_path):
    led = Ledger.open(tmp_path / "run")
    led.start_run(run_id="r", config={"best_metric": "eval_loss"}, config_hash="abc")
    first = led.begin_attempt(world_size=2, stack="ddp", job_id="100")
    cids = []
    for step, loss in ((10, 3.0), (20, 1.0), (30, 2.0)):
        led.append(StepCompleted(step=step, metrics={"loss": loss}), epoch=first.epoch)
        cid = _checkpoint(led, first.epoch, step)
        led.commit_checkpoint(cid, epoch=first.epoch, verify=True)
        cids.append(cid)
    led.append(StepCompleted(step=37), epoch=first.epoch)  # work past the last checkpoint, about to be lost

    # A requeue: the new attempt fences the old one and resumes from the projection.
    view = led.projection()
    assert view.resume.checkpoint_id == cids[2] and view.latest.checkpoint_id == cids[2]
    second = led.begin_attempt(world_size=2, stack="ddp", job_id="101", resumed_from=view.resume.checkpoint_id)
    with pytest.raises(FencedError, match="fenced by epoch 2"):
        led.append(StepCompleted(step=38), epoch=first.epoch)

    # Metrics arriving late still decide best.
    led.append(MetricRecorded(name="eval_loss", value=0.5, step=20, checkpoint_id=cids[1]), epoch=second.epoch)
    view = led.projection()
    assert view.best.checkpoint_id == cids[1] and view.best.value == 0.5
    assert view.attempts[0].status == "crashed" and view.attempts[0].steps_lost == 7
    assert view.goodput == pytest.approx(30 / 37)

    # Retention keeps latest and best, removes the rest, and records both phases.
    deleted = led.apply_retention(RetentionPolicy(keep_last=1), epoch=second.epoch)
    assert [d.checkpoint_id for d in deleted] == [cids[0]]
    assert led.projection().checkpoints[cids[0]].status == "deleted"
    assert not any(led.blobs.exists(s.location) for s in view.checkpoints[cids[0]].shards)
    tags = [e.tag for e in led.events(tags=["checkpoint.deletion_requested", "checkpoint.deleted"])]
    assert tags == ["checkpoint.deletion_requested", "checkpoint.deleted"]

    led.append(AttemptEnded(epoch=second.epoch, reason="completed", last_step=30), epoch=second.epoch)
    led.close()
    ro = Ledger.open(tmp_path / "run", read_only=True)
    assert ro.projection().attempts[1].status == "completed"
    assert ro.projection(at=3).seq == 3
    with pytest.raises(CheckpointNotFoundError):
        ro.projection().checkpoint("nope")


def test_commit_refused_until_every_rank_recorded(tmp_path):
    led = Ledger.open(tmp_path / "run")
    attempt = led.begin_attempt(world_size=2)
    cid = _checkpoint(led, attempt.epoch, 5, skip_rank=1)
    with pytest.raises(IncompleteCheckpointError, match=r"rank\(s\) \[1\]"):
        led.commit_checkpoint(cid, epoch=attempt.epoch)
    assert led.projection().checkpoints[cid].status == "in_flight"
    assert led.projection().resume is None


def test_verify_on_commit_catches_a_flipped_byte(tmp_path):
    led = Ledger.open(tmp_path / "run")
    attempt = led.begin_attempt()
    cid = _checkpoint(led, attempt.epoch, 5, ranks=(0,))
    shard = led.projection().checkpoints[cid].shards[0]
    path = led.blobs.path(shard.location)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match="does not match"):
        led.commit_checkpoint(cid, epoch=attempt.epoch, verify=True)
    assert led.projection().checkpoints[cid].status == "in_flight"


def test_read_only_open_creates_nothing(tmp_path):
    led = Ledger.open(tmp_path / "run")
    led.begin_attempt()
    led.close()
    before = sorted(os.listdir(tmp_path / "run"))
    ro = Ledger.open(tmp_path / "run", read_only=True)
    ro.projection()
    ro.events()
    assert sorted(os.listdir(tmp_path / "run")) == before
    with pytest.raises(FileNotFoundError):
        Ledger.open(tmp_path / "missing", read_only=True)
    assert not (tmp_path / "missing").exists()


def test_writer_snapshots_as_the_log_grows_in_small_steps(tmp_path, monkeypatch):
    import ledger.ledger as ledger_module
    from ledger.projection import PROJECTION_VERSION
    from ledger.store import read_consistent

    monkeypatch.setattr(ledger_module, "SNAPSHOT_EVERY", 20)
    led = Ledger.open(tmp_path / "run")
    attempt = led.begin_attempt()
    for step in range(1, 50):
        led.append(StepCompleted(step=step), epoch=attempt.epoch)
        led.projection()  # a trainer projects often, folding one event at a time
    snap = read_consistent(led.store, lambda r: r.snapshot(at_most=10**9, projection_version=PROJECTION_VERSION))
    assert snap is not None and snap.seq >= 40
    led.close()
    ro = Ledger.open(tmp_path / "run", read_only=True)
    assert ro.projection().last_step == 49
    assert ro.projection().state == ro.full_replay()


def test_checkpoint_ids_are_never_reused_and_only_their_attempt_commits(tmp_path):
    from ledger import DuplicateCheckpointError

    led = Ledger.open(tmp_path / "run")
    dead = led.begin_attempt()
    led.begin_checkpoint(checkpoint_id="step-100", step=100, ranks=[0], world_size=1, stack="ddp", epoch=dead.epoch)
    # A retry by the same attempt is a no-op.
    led.begin_checkpoint(checkpoint_id="step-100", step=100, ranks=[0], world_size=1, stack="ddp", epoch=dead.epoch)
    live = led.begin_attempt()
    with pytest.raises(DuplicateCheckpointError, match="already begun by attempt 1"):
        led.begin_checkpoint(checkpoint_id="step-100", step=100, ranks=[0], world_size=1, stack="ddp", epoch=live.epoch)
    info = led.blobs.write(f"{led.blobs.checkpoint_dir('step-100', dead.epoch)}/r0", b"abc")
    led.record_shards("step-100", [ShardWritten(checkpoint_id="step-100", rank=0, location=info.location,
                                                bytes=info.bytes, hash=info.hash)], epoch=None)
    with pytest.raises(IncompleteCheckpointError, match="begun by attempt 1, not attempt 2"):
        led.commit_checkpoint("step-100", epoch=live.epoch)
    with pytest.raises(ValueError, match="repeats"):
        led.append_many([StepCompleted(step=1), StepCompleted(step=2)], epoch=live.epoch, event_ids=["x", "x"])
