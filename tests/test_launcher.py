"""The launcher: restarts after a dead worker, never restarts a fenced job, SLURM and torchrun entry points."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ledger import Ledger
from trainer.process_group import free_port
from trainer_support import (
    QUICK,
    REPO,
    assert_bitwise_equal,
    cli_env,
    committed_steps,
    events_of,
    export_state,
    finish,
    reference_run,
    run_cli,
    start_cli,
    view_of,
    wait_for,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(400)]

ELASTIC_ROUNDS = Path(__file__).parent / "workloads" / "elastic_rounds.py"


def _inspect_json(run_dir: Path, *args: str) -> dict:
    done = run_cli("inspect", str(run_dir), "--json", *args, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.timeout(240)
def test_max_restarts_recovers_from_a_killed_worker(tmp_path, tmp_path_factory, crash_counter):
    _, reference = reference_run(tmp_path_factory, "ddp")
    run_dir = tmp_path / "run"
    # Rank 1 SIGKILLs itself after step 25 (checkpoint 10 committed, 20 maybe in flight); the agent restarts
    # both workers, which inherit the environment: the marker file keeps the crash to the first round.
    marker = tmp_path / "crashed"
    env = cli_env(CKPT_LEDGER_CRASH_AT="trainer.rank1.after_step:25", CKPT_LEDGER_CRASH_ONCE=str(marker))
    proc = start_cli("train", "--run-dir", str(run_dir), "--nproc", "2", "--max-restarts", "2", *QUICK, env=env)
    done = finish(proc, timeout=200)
    assert done.returncode == 0, done.stderr
    assert marker.exists(), "rank 1 never reached its crash point"
    crash_counter("trainer.worker_sigkill")

    # The restart is a new attempt of the same job, resumed from what the projection said to resume
    # from just before it started: the first attempt's last committed checkpoint.
    first, second = _inspect_json(run_dir)["attempts"]
    assert [first["epoch"], second["epoch"]] == [1, 2] and first["job_id"] == second["job_id"]
    assert first["status"] in ("failed", "crashed") and first["last_step"] < 30, "the run finished before the kill"
    assert second["status"] == "completed" and second["last_step"] == 30
    restarted_at = events_of(run_dir, "attempt.started")[1].seq
    resume_then = _inspect_json(run_dir, "--at", str(restarted_at - 1))["resume"]
    assert second["resumed_from"] == resume_then["checkpoint_id"] and second["first_step"] == resume_then["step"]
    assert view_of(run_dir).checkpoints[second["resumed_from"]].epoch == first["epoch"]
    # The agent stops the surviving worker with SIGTERM; that is a restart, never a preemption.
    assert not events_of(run_dir, "preemption.signalled")
    # Resumed by the restart, the run still ends bitwise where an uninterrupted one does.
    assert_bitwise_equal(reference, export_state(run_dir, tmp_path / "final.pt"))


@pytest.mark.timeout(120)
def test_a_restarted_round_starts_from_an_empty_store():
    """Regression: every restart round used the agent's first store, so new workers could read the
    dead round's gloo addresses (connectFullMesh refused, or a hang) — see ``agent_launch_config``."""
    done = subprocess.run([sys.executable, str(ELASTIC_ROUNDS)], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    by_rank = json.loads(done.stdout.splitlines()[-1])
    assert by_rank == {str(rank): {"round": 1, "stale": False, "sum": 2.0} for rank in (0, 1)}


def test_fenced_job_exits_1_and_is_not_restarted(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_cli("train", "--run-dir", str(run_dir), "--nproc", "2", "--max-restarts", "3",
                     "--steps", "5000", "--ckpt-every", "1000", "--eval-every", "0")
    wait_for(lambda: (view_of(run_dir).last_step or 0) >= 10, timeout=240, proc=proc, what="training to start")
    with Ledger.open(run_dir) as led:  # a second live attempt on the same run
        zombie_killer = led.begin_attempt(world_size=1, stack="ddp")
    done = finish(proc)
    assert done.returncode == 1, done.stderr
    assert f"fenced by epoch {zombie_killer.epoch}" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    # Not restarted: no attempt after the one that fenced it.
    assert [a.epoch for a in view_of(run_dir).attempts] == [1, zombie_killer.epoch]


def test_slurm_identity_is_recorded_and_steps_are_a_total_target(tmp_path):
    run_dir = tmp_path / "run"
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "2", "SLURM_ARRAY_TASK_ID": "7",
             "SLURM_ARRAY_JOB_ID": "4240"}
    done = run_cli("train", "--run-dir", str(run_dir), "--steps", "12", "--ckpt-every", "5", "--eval-every", "0",
                   env=cli_env(**slurm))
    assert done.returncode == 0, done.stderr
    [attempt] = view_of(run_dir).attempts
    assert attempt.job_id == "4242"
    assert attempt.slurm["job_id"] == "4242" and attempt.slurm["restart_count"] == 2
    assert attempt.slurm["array_task_id"] == "7" and attempt.slurm["array_job_id"] == "4240"
    assert committed_steps(run_dir) == [5, 10, 12]  # the final step is always committed

    # A requeue that finds the run already at its target records itself and exits 0.
    again = run_cli("train", "--run-dir", str(run_dir), "--steps", "12", "--ckpt-every", "5", "--eval-every", "0")
    assert again.returncode == 0, again.stderr
    view = view_of(run_dir)
    assert [(a.status, a.last_step) for a in view.attempts] == [("completed", 12), ("completed", 12)]
    assert committed_steps(run_dir) == [5, 10, 12]

    # Raising the target continues the same run from where it stopped.
    more = run_cli("train", "--run-dir", str(run_dir), "--steps", "15", "--ckpt-every", "5", "--eval-every", "0")
    assert more.returncode == 0, more.stderr
    assert view_of(run_dir).attempts[-1].resumed_from.startswith("step000012")
    assert committed_steps(run_dir) == [5, 10, 12, 15]


def _worker_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "trainer", "--run-dir", str(run_dir), "--stack", "fsdp", *QUICK]


@pytest.mark.slow
def test_srun_tasks_map_slurm_ranks(tmp_path, tmp_path_factory):
    """Two processes started the way ``srun --ntasks 2`` starts them: only SLURM_* says who is who."""
    _, reference = reference_run(tmp_path_factory, "fsdp")
    run_dir = tmp_path / "run"
    port = str(free_port())
    procs = [
        subprocess.Popen(_worker_cmd(run_dir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=cli_env(SLURM_JOB_ID="77", SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                                     SLURM_LOCALID=str(rank), SLURM_NNODES="1", MASTER_PORT=port),
                         start_new_session=True)
        for rank in range(2)
    ]
    results = [finish(p) for p in procs]
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    [attempt] = view_of(run_dir).attempts
    assert attempt.world_size == 2 and attempt.slurm["job_id"] == "77" and attempt.status == "completed"
    assert_bitwise_equal(reference, export_state(run_dir, tmp_path / "final.pt"))


@pytest.mark.slow
def test_torchrun_entry_point(tmp_path, tmp_path_factory):
    _, reference = reference_run(tmp_path_factory, "fsdp")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "trainer", "--run-dir", str(run_dir), "--stack", "fsdp", *QUICK]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            start_new_session=True)
    done = finish(proc)
    assert done.returncode == 0, done.stderr
    assert view_of(run_dir).attempts[0].world_size == 2
    assert_bitwise_equal(reference, export_state(run_dir, tmp_path / "final.pt"))
