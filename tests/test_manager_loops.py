"""Users' own loops (examples/own_loop.py: DDP, SGD+momentum, StepLR, own data; examples/fsdp_loop.py: own
``fully_shard`` calls) on 2 processes: SIGKILLed twice and rerun they end bitwise equal to an uninterrupted
run; SIGTERM to the process group saves and exits 75; ``inspect`` shows every attempt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.process_group import free_port
from trainer_support import REPO, assert_bitwise_equal, cli_env, export_state, finish, run_cli, view_of, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EXAMPLES = {"ddp": REPO / "examples" / "own_loop.py", "fsdp": REPO / "examples" / "fsdp_loop.py"}
STEPS = ("--steps", "40", "--save-every", "10")


def torchrun(example: str, run_dir: Path, *args: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = cli_env(**({"CKPT_LEDGER_CRASH_AT": crash_at} if crash_at else {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(EXAMPLES[example]), "--run-dir", str(run_dir), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    return finish(proc, timeout=400)


def inspect_json(run_dir: Path) -> dict:
    done = run_cli("inspect", str(run_dir), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("example", ["ddp", "fsdp"])
def test_killed_twice_and_rerun_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, example):
    reference = tmp_path / "reference"
    assert torchrun(example, reference, *STEPS).returncode == 0
    run_dir = tmp_path / "run"
    # SIGKILL rank 1 while it writes its shards of the 2nd checkpoint (a torn save), then rank 0
    # right after the 2nd commit of the next attempt; the third attempt finishes.
    first = torchrun(example, run_dir, *STEPS, crash_at="trainer.rank1.after_shard_write:2")
    second = torchrun(example, run_dir, *STEPS, crash_at="trainer.after_commit:2")
    assert first.returncode != 0 and second.returncode != 0
    third = torchrun(example, run_dir, *STEPS)
    assert third.returncode == 0, third.stderr
    assert_bitwise_equal(export_state(reference, tmp_path / "ref.pt"), export_state(run_dir, tmp_path / "run.pt"))

    report = inspect_json(run_dir)
    statuses = [a["status"] for a in report["attempts"]]
    assert len(statuses) == 3 and statuses[-1] == "completed", statuses
    assert [a["resumed_from"] for a in report["attempts"]] == [None, "step000010-e1", "step000030-e2"]
    assert report["resume"]["step"] == 40 and report["last_step"] == 40


def start_workers(example: str, run_dir: Path, *args: str) -> list[subprocess.Popen]:
    """Two ranks in one process group of their own, as a batch scheduler starts them."""
    port = str(free_port())
    procs: list[subprocess.Popen] = []
    for rank in range(2):
        env = cli_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, str(EXAMPLES[example]), "--run-dir", str(run_dir), *args], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            process_group=0 if rank == 0 else procs[0].pid))
    return procs


@pytest.mark.parametrize("example", ["ddp", "fsdp"])
def test_sigterm_to_the_process_group_saves_and_exits_75(tmp_path, example):
    run_dir = tmp_path / "run"
    procs = start_workers(example, run_dir, "--steps", "100000", "--save-every", "10", "--sleep", "0.02")
    try:
        wait_for(lambda: (run_dir / "ledger.db").exists() and any(
            c.status == "committed" for c in view_of(run_dir).checkpoints.values()), timeout=300, proc=procs[0])
        os.killpg(procs[0].pid, signal.SIGTERM)
        results = [finish(p, timeout=300) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [r.returncode for r in results] == [75, 75], [r.stderr[-2000:] for r in results]
    view = view_of(run_dir)
    [attempt] = view.attempts
    assert (attempt.status, attempt.reason) == ("preempted", "preempted")
    assert view.resume.step == attempt.last_step  # saved at the step it stopped at
    # Requeued, it resumes from there and finishes.
    resumed = start_workers(example, run_dir, "--steps", str(attempt.last_step + 5), "--save-every", "10")
    assert [finish(p, timeout=300).returncode for p in resumed] == [0, 0]
    report = inspect_json(run_dir)
    assert [a["status"] for a in report["attempts"]] == ["preempted", "completed"]
    assert report["attempts"][1]["resumed_from"] == view.resume.checkpoint_id


def test_sigterm_to_torchrun_reaches_the_workers_which_save(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(EXAMPLES["ddp"]), "--run-dir", str(run_dir), "--steps", "100000", "--save-every", "10",
           "--sleep", "0.02"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "ledger.db").exists() and any(
            c.status == "committed" for c in view_of(run_dir).checkpoints.values()), timeout=300, proc=proc)
        os.killpg(proc.pid, signal.SIGTERM)
        done = finish(proc, timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    # torchrun exits 1 on a signal whatever its workers did (its own rule); the ledger says what they did.
    assert done.returncode != 0
    view = view_of(run_dir)
    [attempt] = view.attempts
    assert attempt.status == "preempted" and view.resume.step == attempt.last_step


def test_a_ledger_rank_0_cannot_read_stops_every_rank_at_once(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ledger.db").write_bytes(b"this is not an sqlite database" * 100)
    procs = start_workers("ddp", run_dir, "--steps", "5")
    results = [finish(p, timeout=120) for p in procs]  # nobody waits for a collective rank 0 never joins
    assert all(r.returncode != 0 for r in results)
    assert "could not open the run's ledger" in results[1].stderr, results[1].stderr[-2000:]
    assert (run_dir / "ledger.db").read_bytes() == b"this is not an sqlite database" * 100
