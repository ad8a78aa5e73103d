"""The framework-independent recorder: a directory of files a framework wrote becomes one ledger checkpoint.

Sharded strategies (Lightning's FSDP, DeepSpeed) save a *directory* through
torch.distributed.checkpoint; Lightning refuses FSDP on CPU, so these tests write that
directory with DCP itself (single process) and drive the recorder as the callbacks do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ledger import Ledger, RetentionPolicy
from trainer.integrations.recorder import CheckpointRecorder, find_resume_target

ENTRY = "model.ckpt"


def save_sharded(recorder: CheckpointRecorder, step: int, state: dict) -> str:
    checkpoint_id = recorder.begin_checkpoint(step, world_size=1, stack="test-dcp")
    dcp.save(state, checkpoint_id=recorder.checkpoint_dir(checkpoint_id) / ENTRY)
    recorder.commit_directory(checkpoint_id, step)
    return checkpoint_id


def state_at(step: int) -> dict:
    return {"w": torch.full((64,), float(step)), "nested": {"b": torch.arange(8) + step}}


def test_a_dcp_directory_is_recorded_file_by_file_and_resumed_verified(run_dir: Path) -> None:
    recorder = CheckpointRecorder(run_dir, integration="test", policy=RetentionPolicy())
    recorder.begin_attempt(world_size=1, stack="test-dcp", resumed_from_path=None)
    first = save_sharded(recorder, 10, state_at(10))
    second = save_sharded(recorder, 20, state_at(20))
    recorder.end_attempt("completed", 20)
    recorder.close()

    with Ledger.open(run_dir, read_only=True) as led:
        ckpt = led.projection().checkpoint(second)
        tags = [e.tag for e in led.events()  # alias.promoted (latest/best history) names it too
                if getattr(e.event, "checkpoint_id", None) == second and e.tag != "alias.promoted"]
    on_disk = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "blobs" / second).rglob("*") if p.is_file())
    assert sorted(s.location for s in ckpt.shards) == on_disk and len(on_disk) >= 2  # .metadata + shard files
    assert all(s.hash.startswith("xxh3-128:") for s in ckpt.shards)
    assert tags[0] == "checkpoint.started" and tags[-1] == "checkpoint.committed"
    assert set(tags[1:-1]) == {"shard.written"}

    target = find_resume_target(run_dir, entry=ENTRY)
    assert (target.checkpoint_id, target.step) == (second, 20)
    assert target.path == run_dir / "blobs" / second / "e1" / ENTRY and target.path.is_dir()
    loaded = {"w": torch.zeros(64), "nested": {"b": torch.zeros(8, dtype=torch.long)}}
    dcp.load(loaded, checkpoint_id=target.path)
    assert torch.equal(loaded["w"], state_at(20)["w"])

    # One flipped byte in one shard file: the whole checkpoint is passed over, the fact recorded.
    shard = next(s for s in ckpt.shards if s.location.endswith(".distcp"))
    data = bytearray((run_dir / shard.location).read_bytes())
    data[-1] ^= 0x10
    (run_dir / shard.location).write_bytes(bytes(data))
    target = find_resume_target(run_dir, entry=ENTRY)
    assert target.checkpoint_id == first
    with Ledger.open(run_dir, read_only=True) as led:
        (event,) = [e.event for e in led.events(tags=["corruption.detected"])]
        assert led.projection().checkpoint(second).status == "corrupt"
    assert (event.checkpoint_id, event.location) == (second, shard.location)


def test_resumed_from_is_the_checkpoint_holding_the_loaded_path(run_dir: Path) -> None:
    recorder = CheckpointRecorder(run_dir, integration="test", policy=RetentionPolicy())
    recorder.begin_attempt(world_size=1, stack="test-dcp", resumed_from_path=None)
    saved = save_sharded(recorder, 5, state_at(5))
    recorder.end_attempt("preempted", 5, signal_name="SIGUSR1")
    recorder.close()
    assert recorder.exit_code == 75

    again = CheckpointRecorder(run_dir, integration="test", policy=RetentionPolicy())
    again.begin_attempt(world_size=1, stack="test-dcp",
                        resumed_from_path=find_resume_target(run_dir, entry=ENTRY).path)
    again.close()
    with Ledger.open(run_dir, read_only=True) as led:
        attempts = led.projection().attempts
    assert [a.resumed_from for a in attempts] == [None, saved]
    assert attempts[0].preempted_by == "SIGUSR1"


def test_a_save_that_wrote_nothing_is_aborted_not_committed(run_dir: Path) -> None:
    recorder = CheckpointRecorder(run_dir, integration="test", policy=RetentionPolicy())
    recorder.begin_attempt(world_size=1, stack="test", resumed_from_path=None)
    checkpoint_id = recorder.begin_checkpoint(3, world_size=1, stack="test")
    with pytest.raises(ValueError, match="wrote no files"):
        recorder.commit_directory(checkpoint_id, 3)
    recorder.close()
    with Ledger.open(run_dir, read_only=True) as led:
        assert led.projection().checkpoint(checkpoint_id).status == "aborted"
    assert find_resume_target(run_dir, entry=ENTRY) is None
