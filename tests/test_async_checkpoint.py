"""Asynchronous checkpoints: reused staging buffers, one in flight, a synchronous final save, failures surfaced.

Exact resume with background checkpoints is proved by tests/test_resume_exact.py (the
trainer's default is asynchronous); these tests pin the mechanics.
"""

from __future__ import annotations

import json

import pytest
import torch

from distributed_ranks import run_ranks
from trainer.staging import StagingArea
from trainer_support import events_of, view_of


def _config(run_dir, stack: str, **extra) -> str:
    return json.dumps({"run_dir": str(run_dir), "stack": stack, "steps": 30, "ckpt_every": 10, "eval_every": 10,
                       "print_every": 0, "dist_timeout_s": 60.0, **extra})


def test_staging_copies_into_buffers_allocated_once():
    weight = torch.randn(4, 3)
    state = {"model": {"w": weight, "step": torch.tensor(5.0)},
             "optim": {"param_groups": [{"lr": 0.1, "params": ["w"]}]}, "trainer": b"opaque"}
    area = StagingArea()
    first = area.stage(state)
    buffer = first["model"]["w"]
    assert buffer.data_ptr() != weight.data_ptr() and torch.equal(buffer, weight)
    assert area.allocations == 2 and area.staged_bytes == 4 * 3 * 4 + 4

    # The snapshot is independent of the live state: training may go on mutating it.
    weight.add_(1.0)
    state["optim"]["param_groups"][0]["lr"] = 0.2
    assert not torch.equal(buffer, weight) and first["optim"]["param_groups"][0]["lr"] == 0.1
    assert first["trainer"] == b"opaque"

    # The next snapshot reuses the same buffers: no allocation in the steady state.
    second = area.stage(state)
    assert second["model"]["w"].data_ptr() == buffer.data_ptr() and torch.equal(second["model"]["w"], weight)
    assert area.allocations == 2

    # A tensor that changed shape gets a new buffer.
    state["model"]["w"] = torch.zeros(2, 2)
    area.stage(state)
    assert area.allocations == 3


def test_staging_shared_between_copy_threads_copies_every_tensor_exactly():
    state = {"big": torch.randn(1000, 100), "mid": [torch.randn(5000), torch.arange(300)], "tiny": torch.tensor(1.5)}
    area = StagingArea(copy_threads=2)
    for _ in range(2):  # the helper thread is made once and reused
        snapshot = area.stage(state)
        assert torch.equal(snapshot["big"], state["big"]) and snapshot["big"].data_ptr() != state["big"].data_ptr()
        assert all(torch.equal(a, b) for a, b in zip(snapshot["mid"], state["mid"]))
        assert torch.equal(snapshot["tiny"], state["tiny"])
        state["big"].add_(1.0)
    assert area.allocations == 4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stack", ["ddp", "fsdp"])
def test_background_checkpoints_stage_once_and_the_final_one_is_synchronous(tmp_path, stack):
    out = tmp_path / "out"
    result = run_ranks("async_ckpt_rank.py", ["--config", _config(tmp_path / "run", stack), "--scenario", "timings",
                                              "--out", str(out)], 2, timeout=240, log_dir=tmp_path / "logs")
    assert result.returncodes == [0, 0], result.describe()
    found = json.loads((out / "result.json").read_text())
    timings = found["timings"]
    assert [(t["checkpoint_id"], t["synchronous"], t["committed"]) for t in timings] == [
        ("step000010-e1", False, True), ("step000020-e1", False, True), ("step000030-e1", True, True)]
    # Staging buffers are allocated by the first background checkpoint and reused by the next.
    first, second = found["allocations"]
    assert first > 0 and second == first
    assert found["staging_exact"] == [True, True]  # staged copies equal the live (sharded) state
    assert found["refused_second"] is True  # never two in flight
    for timing in timings[:2]:  # the training thread went on while the writer made it durable
        assert timing["bytes"] > 0 and timing["durable_s"] > timing["stall_s"]
    view = view_of(tmp_path / "run")
    assert [c.status for c in view.checkpoints.values()] == ["committed"] * 3
    assert view.attempts[0].status == "completed"


@pytest.mark.timeout(300)
def test_a_background_failure_aborts_the_checkpoint_and_raises_on_the_training_thread(tmp_path):
    run_dir = tmp_path / "run"
    result = run_ranks("async_ckpt_rank.py", ["--config", _config(run_dir, "ddp"), "--scenario", "commit_fails",
                                              "--out", str(tmp_path / "out")], 2, timeout=240,
                       log_dir=tmp_path / "logs")
    assert result.returncodes == [3, 3], result.describe()
    assert "raised: background checkpoint step000010-e1 failed: LedgerWriteError" in result.outputs[0]
    assert "raised: a peer's background checkpoint writer failed" in result.outputs[1]
    view = view_of(run_dir)
    ckpt = view.checkpoints["step000010-e1"]
    assert ckpt.status == "aborted" and "injected" in ckpt.abort_reason
    assert view.attempts[0].status == "failed" and view.resume is None
    tags = [e.tag for e in events_of(run_dir) if getattr(e.event, "checkpoint_id", None) == "step000010-e1"
            and e.tag != "metric.recorded"]
    assert tags == ["checkpoint.started", "checkpoint.aborted"]  # the refused append recorded nothing
