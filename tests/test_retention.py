"""Retention: the plan's reasons, protected checkpoints, and crash-safe execution (in-process and SIGKILL)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ledger import Ledger, RetentionPolicy
from ledger.events import AliasPromoted, CheckpointPinned, MetricRecorded, ShardWritten
from ledger import retention


def checkpoint(led: Ledger, cid: str, step: int, epoch: int, commit: bool = True) -> str:
    led.begin_checkpoint(checkpoint_id=cid, step=step, ranks=[0], world_size=1, stack="ddp", epoch=epoch)
    info = led.blobs.write(f"{led.blobs.checkpoint_dir(cid, epoch)}/rank0.bin", cid.encode() * 10)
    led.record_shards(cid, [ShardWritten(checkpoint_id=cid, rank=0, location=info.location, bytes=info.bytes,
                                         hash=info.hash)], epoch=epoch)
    if commit:
        led.commit_checkpoint(cid, epoch=epoch)
    return info.location


@pytest.fixture
def led(run_dir):
    with Ledger.open(run_dir) as handle:
        handle.start_run(run_id="r", config={})
        yield handle


def reasons(deletions) -> dict[str, str]:
    return {d.checkpoint_id: d.reason for d in deletions}


def test_policy_validation():
    with pytest.raises(ValueError):
        RetentionPolicy(keep_last=-1)
    with pytest.raises(ValueError):
        RetentionPolicy(keep_every=0)
    assert not RetentionPolicy().active
    assert RetentionPolicy(keep_last=2, keep_every=10).describe() == "keep-last 2, keep-every 10"


def test_plan_reasons_and_protection(led):
    a = led.begin_attempt().epoch
    for step in (10, 20, 30, 40, 50, 60):
        checkpoint(led, f"s{step}", step, a)
    led.append(MetricRecorded(name="eval_loss", value=0.1, step=10, checkpoint_id="s10"), epoch=a)  # best
    led.append(CheckpointPinned(checkpoint_id="s20"))
    led.append(AliasPromoted(alias="golden", checkpoint_id="s30"))
    checkpoint(led, "s70", 70, a, commit=False)  # live save in flight
    plan = led.apply_retention(RetentionPolicy(keep_last=1), epoch=None, dry_run=True)
    assert reasons(plan) == {"s40": "not kept by policy (keep-last 1)", "s50": "not kept by policy (keep-last 1)"}
    assert led.projection().protected() == {"s70": "in flight", "s20": "pinned", "s30": "alias golden",
                                            "s60": "resume target", "s10": "best"}
    plan = led.apply_retention(RetentionPolicy(keep_last=1, keep_every=20), epoch=None, dry_run=True)
    assert reasons(plan) == {"s50": "not kept by policy (keep-last 1, keep-every 20)"}
    assert led.apply_retention(RetentionPolicy(), epoch=None, dry_run=True) == []


def test_torn_save_of_a_dead_attempt_is_cleaned_even_without_a_policy(led):
    a = led.begin_attempt().epoch
    checkpoint(led, "s10", 10, a)
    checkpoint(led, "torn", 20, a, commit=False)
    assert led.apply_retention(RetentionPolicy(), epoch=None, dry_run=True) == []  # attempt a is still live
    led.begin_attempt(resumed_from="s10")
    plan = led.apply_retention(RetentionPolicy(), epoch=None, dry_run=True)
    assert reasons(plan) == {"torn": "torn save of attempt 1: never committed"}


def test_pinned_or_aliased_torn_save_is_not_deleted(led):
    a = led.begin_attempt().epoch
    checkpoint(led, "pinned", 10, a, commit=False)
    checkpoint(led, "aliased", 11, a, commit=False)
    led.append(CheckpointPinned(checkpoint_id="pinned"))
    led.append(AliasPromoted(alias="debug", checkpoint_id="aliased"))
    led.begin_attempt()
    assert led.apply_retention(RetentionPolicy(keep_last=0), epoch=None, dry_run=True) == []


def test_execute_requests_before_removing_blobs_and_confirms_after(led):
    a = led.begin_attempt().epoch
    old = checkpoint(led, "s10", 10, a)
    checkpoint(led, "s20", 20, a)
    seen = []
    original = led.blobs.delete

    def delete(location):
        # At the moment a blob is removed, the log must already say the deletion was requested.
        view = led.projection()
        seen.append((location, view.checkpoints["s10"].deletion_requested, view.checkpoints["s10"].status))
        original(location)

    led.blobs.delete = delete
    done = led.apply_retention(RetentionPolicy(keep_last=1), epoch=None)
    assert [d.checkpoint_id for d in done] == ["s10"]
    assert seen == [(old, True, "deleted")]  # never loadable once deletion is requested
    tags = [s.tag for s in led.events()][-2:]
    assert tags == ["checkpoint.deletion_requested", "checkpoint.deleted"]
    assert led.projection().checkpoints["s10"].status == "deleted"
    assert not led.blobs.exists(old)
    assert led.apply_retention(RetentionPolicy(keep_last=1), epoch=None) == []  # idempotent


class Crash(Exception):
    """Stands in for the process dying at a crash point."""


@pytest.mark.parametrize("point", ["retention.after_deletion_requested", "retention.after_blob_removed"])
def test_crash_between_request_and_deleted_is_finished_by_the_next_run(led, monkeypatch, point):
    a = led.begin_attempt().epoch
    old = checkpoint(led, "s10", 10, a)
    checkpoint(led, "s20", 20, a)

    def crash(name):
        if name == point:
            raise Crash(name)

    monkeypatch.setattr(retention, "crash_point", crash)
    with pytest.raises(Crash):
        led.apply_retention(RetentionPolicy(keep_last=1), epoch=None)
    monkeypatch.undo()
    view = Ledger.open(led.run_dir, read_only=True).projection()
    assert view.checkpoints["s10"].deletion_requested and not view.checkpoints["s10"].deletion_done
    assert view.resume.checkpoint_id == "s20" and not view.checkpoints["s10"].usable
    # The next run, under any policy (even none), finishes the job.
    with Ledger.open(led.run_dir) as again:
        plan = again.apply_retention(RetentionPolicy(), epoch=None, dry_run=True)
        assert reasons(plan) == {"s10": "finish interrupted deletion (not kept by policy (keep-last 1))"}
        again.apply_retention(RetentionPolicy(), epoch=None)
        assert again.projection().checkpoints["s10"].status == "deleted"
    assert not led.blobs.exists(old)


_GC = textwrap.dedent(
    """
    import sys
    from ledger import Ledger, RetentionPolicy
    with Ledger.open(sys.argv[1]) as led:
        led.apply_retention(RetentionPolicy(keep_last=1), epoch=None)
    """
)


@pytest.mark.parametrize("point", ["retention.after_deletion_requested", "retention.after_blob_removed:2",
                                   "retention.after_deleted"])
def test_sigkill_during_gc_is_finished_by_the_next_run(led, point):
    a = led.begin_attempt().epoch
    locations = {f"s{step}": checkpoint(led, f"s{step}", step, a) for step in (10, 20, 30)}
    env = {**os.environ, "CKPT_LEDGER_CRASH_AT": point, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _GC, str(led.run_dir)], env=env, timeout=120)
    assert proc.returncode == -9  # SIGKILLed at the crash point
    view = Ledger.open(led.run_dir, read_only=True).projection()
    assert view.resume.checkpoint_id == "s30"
    assert view.checkpoints["s20"].deletion_requested  # the plan deletes the highest step first
    with Ledger.open(led.run_dir) as again:
        again.apply_retention(RetentionPolicy(keep_last=1), epoch=None)
        final = again.projection()
    assert {c: final.checkpoints[c].status for c in locations} == {"s10": "deleted", "s20": "deleted", "s30": "committed"}
    assert sorted(led.blobs.list_files()) == [locations["s30"]]
