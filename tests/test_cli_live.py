"""Read commands on a run a writer has open: they work, see its appends, and create or change no file."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from ledger import Ledger
from ledger.events import StepCompleted
from runs import build_healthy_run, cli_argv, cli_env, crash_mid_checkpoint, save_checkpoint


def names(run_dir):
    return sorted(os.path.relpath(os.path.join(d, f), run_dir) for d, _, files in os.walk(run_dir) for f in files)


def run(*args):
    return subprocess.run(cli_argv(*args), env=cli_env(), capture_output=True, text=True, timeout=120)


@pytest.fixture
def live(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    led = Ledger.open(info.run_dir)
    attempt = led.begin_attempt(job_id="live", resumed_from=info.committed[-1])
    save_checkpoint(led, attempt.epoch, 60)
    crash_mid_checkpoint(led, attempt.epoch, 70)  # a save in progress: one shard recorded, one being written
    assert (info.run_dir / "ledger.db-wal").exists() and (info.run_dir / "ledger.db-shm").exists()
    yield info, led, attempt
    led.close()


def test_read_commands_on_a_live_run(live, tmp_path):
    info, led, attempt = live
    before = names(info.run_dir)
    inspect = run("inspect", info.run_dir, "--json")
    assert inspect.returncode == 0, inspect.stderr
    data = json.loads(inspect.stdout)
    assert data["latest"]["step"] == 60 and data["attempts"][-1]["status"] == "running"
    assert {c["checkpoint_id"]: c["status"] for c in data["checkpoints"]}["step000070-e3"] == "in_flight"
    assert run("replay", info.run_dir).returncode == 0
    assert run("tail", info.run_dir).returncode == 0
    audit = run("audit", info.run_dir, "--json", "--verify-blobs")
    assert audit.returncode == 0, audit.stdout  # a live save is not a problem
    notes = {f["kind"] for f in json.loads(audit.stdout)["findings"]}
    assert {"running_attempt", "in_flight_checkpoint", "files_in_progress"} <= notes
    assert run("gc", info.run_dir, "--dry-run").returncode == 0
    assert run("timeline", info.run_dir, "--out", tmp_path / "live.png").returncode == 0
    assert names(info.run_dir) == before

    # The writer keeps going; the next read sees it.
    led.append(StepCompleted(step=71), epoch=attempt.epoch)
    assert json.loads(run("inspect", info.run_dir, "--json").stdout)["last_step"] == 71
    assert names(info.run_dir) == before
