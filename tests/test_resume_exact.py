"""A run killed at any moment and restarted ends bitwise identical to an uninterrupted one (ddp and fsdp)."""

from __future__ import annotations

import signal

import pytest

from trainer_support import (
    QUICK,
    assert_bitwise_equal,
    cli_env,
    committed_steps,
    export_state,
    kill_group,
    reference_run,
    run_cli,
    start_cli,
    view_of,
    wait_for,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(600)]


@pytest.mark.parametrize("stack", ["ddp", "fsdp"])
def test_killed_twice_then_resumed_is_bitwise_identical(tmp_path, tmp_path_factory, stack):
    _, reference = reference_run(tmp_path_factory, stack)
    run_dir = tmp_path / "run"
    args = ("train", "--run-dir", str(run_dir), "--stack", stack, "--nproc", "2", *QUICK)

    # 1. SIGKILL the launcher's whole process group mid-run, once a first checkpoint is committed.
    proc = start_cli(*args)
    wait_for(lambda: bool(committed_steps(run_dir)), timeout=240, proc=proc, what="the first commit")
    kill_group(proc, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert 30 not in committed_steps(run_dir), "the run finished before it could be killed"

    # 2. Every worker SIGKILLs itself right after writing (and hashing) its shards of the next
    #    checkpoint: that checkpoint stays in flight and is never resumed from.
    crashed = run_cli(*args, env=cli_env(CKPT_LEDGER_CRASH_AT="trainer.after_shard_write"))
    assert crashed.returncode == 1, crashed.stderr
    assert "SIGKILL" in crashed.stderr
    view = view_of(run_dir)
    torn = [c for c in view.checkpoints.values() if c.epoch == 2]
    assert len(torn) == 1 and torn[0].status == "in_flight"

    # 3. Run to the end: it resumes from the newest committed checkpoint.
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    view = view_of(run_dir)
    assert [a.status for a in view.attempts][-1] == "completed"
    assert len(view.attempts) == 3
    last = view.attempts[-1]
    assert last.resumed_from is not None and view.checkpoints[last.resumed_from].epoch <= 2
    assert view.checkpoints[last.resumed_from].status == "committed"
    assert view.resume.step == 30

    assert_bitwise_equal(reference, export_state(run_dir, tmp_path / "final.pt"))
