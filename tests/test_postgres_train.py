"""`ckpt-ledger train` with its ledger on a real PostgreSQL server and its shards in a --blobs directory."""

from __future__ import annotations

import signal

import pytest

from ledger import Ledger
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

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(900)]


def test_killed_twice_then_resumed_is_bitwise_identical_to_a_local_run(tmp_path, tmp_path_factory, pg_run_url):
    _, reference = reference_run(tmp_path_factory, "ddp")
    url, blobs = pg_run_url, tmp_path / "blobs"
    args = ("train", "--run-dir", url, "--blobs", str(blobs), "--stack", "ddp", "--nproc", "2", *QUICK)

    # 1. SIGKILL the launcher's whole process group once a first checkpoint is committed.
    proc = start_cli(*args)
    wait_for(lambda: bool(committed_steps(url)), timeout=300, proc=proc, what="the first commit")
    kill_group(proc, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert 30 not in committed_steps(url), "the run finished before it could be killed"

    # 2. Every worker SIGKILLs itself after writing its shards of the next checkpoint (never committed).
    crashed = run_cli(*args, env=cli_env(CKPT_LEDGER_CRASH_AT="trainer.after_shard_write"))
    assert crashed.returncode == 1, crashed.stderr
    torn = [c for c in view_of(url).checkpoints.values() if c.epoch == 2]
    assert len(torn) == 1 and torn[0].status == "in_flight"

    # 3. Run to the end (the recorded --blobs is found from run.started): it resumes and finishes.
    done = run_cli("train", "--run-dir", url, "--stack", "ddp", "--nproc", "2", *QUICK)
    assert done.returncode == 0, done.stderr
    view = view_of(url)
    assert [a.status for a in view.attempts] == ["crashed", "crashed", "completed"]
    assert view.checkpoints[view.attempts[-1].resumed_from].status == "committed"
    assert view.resume.step == 30
    assert sorted(p.name for p in blobs.iterdir()) == ["blobs"]  # the shards live under --blobs only

    assert_bitwise_equal(reference, export_state(url, tmp_path / "final.pt"))
    # The second crash left a torn save's files under --blobs: audit names them, gc removes them.
    audit = run_cli("audit", url)
    assert audit.returncode == 1 and "torn_checkpoint" in audit.stdout, audit.stdout + audit.stderr
    gc = run_cli("gc", url)
    assert gc.returncode == 0, gc.stderr
    audit = run_cli("audit", url, "--verify-blobs")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_a_database_run_without_blobs_is_refused_at_once_and_records_nothing(pg_run_url):
    done = run_cli("train", "--run-dir", pg_run_url, "--stack", "ddp", "--nproc", "2", *QUICK, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--blobs" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    with Ledger.open(pg_run_url, read_only=True) as ro:
        assert ro.max_seq() == 0


@pytest.fixture
def own_server():
    """A server of this test's own (it gets restarted)."""
    from pg_server import PostgresServer

    server = PostgresServer()
    server.start()
    yield server
    server.destroy()


def test_server_restart_mid_run_fails_the_attempt_cleanly_and_the_next_one_resumes(tmp_path, own_server):
    url = own_server.create_database("ledger") + "?run=r1"
    args = ("train", "--run-dir", url, "--blobs", str(tmp_path / "blobs"), "--stack", "ddp", "--nproc", "2",
            "--steps", "60", "--ckpt-every", "10", "--eval-every", "10")
    proc = start_cli(*args)
    wait_for(lambda: bool(committed_steps(url)), timeout=300, proc=proc, what="the first commit")
    own_server.restart()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    # The writer (rank 0) says what happened in one line; the launcher's last line names it.
    assert "worker rank 0 crashed: LedgerUnavailableError: postgresql://" in err, err
    assert "terminating connection" in err or "connection" in err.split("LedgerUnavailableError")[1], err
    assert err.strip().splitlines()[-1].startswith("ckpt-ledger: error: worker rank 0 failed"), err
    assert "Traceback" not in err, err
    view = view_of(url)
    assert view.last_step is not None and view.last_step < 60
    resumed = view.resume
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    after = view_of(url)
    assert after.attempts[-1].status == "completed" and after.resume.step == 60
    assert after.attempts[-1].resumed_from is not None
    assert after.checkpoints[after.attempts[-1].resumed_from].step >= resumed.step


@pytest.mark.slow  # `make test-all`: the restart-and-resume path itself is covered by the test above
def test_with_max_restarts_a_server_restart_is_recovered_within_the_same_job(tmp_path, own_server):
    url = own_server.create_database("ledger") + "?run=r1"
    args = ("train", "--run-dir", url, "--blobs", str(tmp_path / "blobs"), "--stack", "ddp", "--nproc", "2",
            "--steps", "60", "--ckpt-every", "10", "--eval-every", "10", "--max-restarts", "2")
    proc = start_cli(*args)
    wait_for(lambda: bool(committed_steps(url)), timeout=300, proc=proc, what="the first commit")
    own_server.restart()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "LedgerUnavailableError" in err  # the crash was reported, then the agent restarted the workers
    view = view_of(url)
    assert len(view.attempts) >= 2 and view.attempts[-1].status == "completed" and view.resume.step == 60
