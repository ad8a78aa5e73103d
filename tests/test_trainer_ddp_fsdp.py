"""Two-process ddp and fsdp runs: coordinated sharded checkpoints committed through rank 0."""

from __future__ import annotations

import pytest

from ledger import Ledger
from trainer.default_job import JobSpec, TinyLM
from trainer.identity import config_hash
from trainer_support import QUICK, cli_env, committed_steps, events_of, reference_run, run_cli, view_of

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]


@pytest.mark.parametrize("stack", ["ddp", "fsdp"])
def test_two_process_run_commits_every_rank_shards(tmp_path_factory, stack):
    run_dir, exported = reference_run(tmp_path_factory, stack)
    view = view_of(run_dir)

    [attempt] = view.attempts
    assert (attempt.status, attempt.last_step, attempt.world_size, attempt.stack) == ("completed", 30, 2, stack)
    assert attempt.topology == {"tp": 1, "pp": 1, "dp": 2} and attempt.resumed_from is None

    checkpoints = list(view.checkpoints.values())
    assert [(c.step, c.status) for c in checkpoints] == [(10, "committed"), (20, "committed"), (30, "committed")]
    blobs = Ledger.open(run_dir, read_only=True).blobs
    for ckpt in checkpoints:
        assert ckpt.ranks == [0, 1] and {s.rank for s in ckpt.shards} == {0, 1}
        assert sum(s.location.endswith("/.metadata") for s in ckpt.shards) == 1
        for shard in ckpt.shards:
            assert shard.hash.startswith("xxh3-128:") and shard.codec == "none"
            blobs.verify(shard.location, shard.hash, shard.bytes)
            assert shard.location.startswith(f"blobs/{ckpt.checkpoint_id}/e{attempt.epoch}/")

    # Two-phase order per checkpoint: started, one shard.written per file, committed.
    tags = [(e.tag, getattr(e.event, "checkpoint_id", None)) for e in events_of(run_dir)]
    for ckpt in checkpoints:
        mine = [tag for tag, cid in tags if cid == ckpt.checkpoint_id and tag not in ("metric.recorded", "alias.promoted")]
        assert mine == ["checkpoint.started"] + ["shard.written"] * len(ckpt.shards) + ["checkpoint.committed"]

    # eval_loss at every checkpoint step, tied to the checkpoint: best is meaningful.
    metrics = [e.event for e in events_of(run_dir, "metric.recorded")]
    assert [(m.name, m.step) for m in metrics] == [("eval_loss", 10), ("eval_loss", 20), ("eval_loss", 30)]
    assert all(m.checkpoint_id == checkpoints[i].checkpoint_id for i, m in enumerate(metrics))
    assert view.best is not None and view.best.value == min(m.value for m in metrics)

    # The loss falls visibly.
    steps = [e.event for e in events_of(run_dir, "step.completed")]
    assert [s.step for s in steps] == list(range(1, 31))
    assert steps[-1].metrics["loss"] < steps[0].metrics["loss"] - 1.0

    # Identity: the stored config hashes to the stored hash.
    assert view.run.config_hash == config_hash(view.run.config)
    assert view.run.config["stack"] == stack

    # The export is the plain model: the same names and shapes as an unwrapped TinyLM.
    plain = TinyLM(JobSpec()).state_dict()
    assert sorted(exported) == sorted(plain)
    assert all(exported[k].shape == plain[k].shape for k in plain)


def test_a_rank_failing_to_write_aborts_the_checkpoint_and_training_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    # Rank 1's shard file of the first and the final checkpoint cannot be created: a directory is in its place.
    for cid in ("step000010-e1", "step000030-e1"):
        (run_dir / "blobs" / cid / "e1" / "__1_0.distcp").mkdir(parents=True)
    done = run_cli("train", "--run-dir", str(run_dir), "--nproc", "2", *QUICK)
    assert done.returncode == 0, done.stderr
    view = view_of(run_dir)
    first = view.checkpoints["step000010-e1"]
    assert first.status == "aborted" and "rank 1" in first.abort_reason
    # No shard recorded, never committed (the eval metric of step 10 may name it while it is in flight).
    assert [e.tag for e in events_of(run_dir) if getattr(e.event, "checkpoint_id", None) == "step000010-e1"
            and e.tag != "metric.recorded"] == ["checkpoint.started", "checkpoint.aborted"]
    # The final step is always committed: its aborted checkpoint is retried under a new id.
    assert view.checkpoints["step000030-e1"].status == "aborted"
    assert view.checkpoints["step000030-e1-r1"].status == "committed"
    assert committed_steps(run_dir) == [20, 30] and view.attempts[0].status == "completed"


def test_a_rank_dying_mid_checkpoint_leaves_it_aborted(tmp_path, crash_counter):
    run_dir = tmp_path / "run"
    done = run_cli("train", "--run-dir", str(run_dir), "--nproc", "2", *QUICK,
                   env=cli_env(CKPT_LEDGER_CRASH_AT="trainer.rank1.after_shard_write"))
    crash_counter("trainer.rank1.after_shard_write")
    assert done.returncode == 1, done.stderr
    view = view_of(run_dir)
    [ckpt] = view.checkpoints.values()
    assert ckpt.status == "aborted" and "lost a rank" in ckpt.abort_reason
    assert view.attempts[0].status == "failed"
