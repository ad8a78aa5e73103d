"""SIGTERM/SIGUSR1: checkpoint at the next step boundary, record the preemption, exit 75 — however it arrives."""

from __future__ import annotations

import signal

import pytest

from trainer_support import QUICK, assert_bitwise_equal, events_of, export_state, finish, kill_group, \
    reference_run, run_cli, start_cli, view_of, wait_for

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(400)]

LONG = ["--steps", "5000", "--ckpt-every", "1000", "--eval-every", "0"]


def _assert_preempted_and_saved(run_dir, done, signal_name: str) -> None:
    assert done.returncode == 75, done.stderr
    assert "preempted" in done.stderr and "Traceback" not in done.stderr
    view = view_of(run_dir)
    attempt = view.attempts[-1]
    assert attempt.status == "preempted" and attempt.preempted_by == signal_name
    # The state at the stopping step is committed: a requeue loses nothing.
    assert view.resume is not None and view.resume.step == attempt.last_step
    assert 0 < attempt.last_step < 5000
    tail = [e.tag for e in events_of(run_dir)][-2:]
    assert tail == ["preemption.signalled", "attempt.ended"]
    [signalled] = [e.event for e in events_of(run_dir, "preemption.signalled")]
    assert signalled.signal == signal_name and signalled.step == attempt.last_step


@pytest.mark.parametrize("target", ["launcher", "process-group"])
def test_sigterm_to_launcher_or_whole_group_saves_and_exits_75(tmp_path, target):
    run_dir = tmp_path / "run"
    proc = start_cli("train", "--run-dir", str(run_dir), "--nproc", "2", *LONG)
    wait_for(lambda: (view_of(run_dir).last_step or 0) >= 10, timeout=240, proc=proc, what="training to start")
    if target == "launcher":
        proc.send_signal(signal.SIGTERM)  # only the launcher: it must forward, then wait for the workers
    else:
        kill_group(proc, signal.SIGTERM)  # as scancel/SLURM do: every process at once
    _assert_preempted_and_saved(run_dir, finish(proc), "SIGTERM")


def test_sigusr1_single_process(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_cli("train", "--run-dir", str(run_dir), "--nproc", "1", *LONG)
    wait_for(lambda: (view_of(run_dir).last_step or 0) >= 10, timeout=240, proc=proc, what="training to start")
    proc.send_signal(signal.SIGUSR1)
    _assert_preempted_and_saved(run_dir, finish(proc), "SIGUSR1")


@pytest.mark.slow
def test_preempted_then_requeued_run_is_bitwise_identical(tmp_path, tmp_path_factory):
    _, reference = reference_run(tmp_path_factory, "ddp")
    run_dir = tmp_path / "run"
    args = ("train", "--run-dir", str(run_dir), "--nproc", "2", *QUICK)
    proc = start_cli(*args)
    wait_for(lambda: (view_of(run_dir).last_step or 0) >= 10, timeout=240, proc=proc, what="training to start")
    kill_group(proc, signal.SIGTERM)
    done = finish(proc)
    assert done.returncode == 75, done.stderr
    stopped_at = view_of(run_dir).attempts[-1].last_step
    assert stopped_at < 30, "the run finished before the signal arrived"
    requeued = run_cli(*args)
    assert requeued.returncode == 0, requeued.stderr
    assert view_of(run_dir).attempts[-1].resumed_from is not None
    assert_bitwise_equal(reference, export_state(run_dir, tmp_path / "final.pt"))
