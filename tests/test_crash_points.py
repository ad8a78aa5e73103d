"""SIGKILL at every named crash point of the commit and retention protocols, then recover.

Each case runs a real writer process with ``CKPT_LEDGER_CRASH_AT`` set, lets it
die at the point, and checks the ledger afterwards: every acknowledged event is
present, the view is exactly pre- or post-commit, no torn checkpoint is ever the
resume target, and a restarted writer finishes the run with all shards verifying.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ledger import Ledger
from ledger.faults import CRASH_POINTS

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = Path(__file__).parent / "workloads" / "ledger_writer.py"
CHECKPOINTS = 5


def run_writer(run_dir: Path, crash_at: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CKPT_LEDGER_CRASH_AT", None)
    if crash_at:
        env["CKPT_LEDGER_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, str(WORKLOAD), str(run_dir), str(CHECKPOINTS)], env=env,
                          capture_output=True, text=True, timeout=120)


def acknowledged(stdout: str) -> dict[int, str]:
    return {int(p[1]): p[2] for p in (line.split() for line in stdout.splitlines()) if p and p[0] == "ack"}


def check_invariants(run_dir: Path, acks: dict[int, str]) -> None:
    led = Ledger.open(run_dir, read_only=True)
    stored = {e.seq: e.tag for e in led.events()}
    assert list(stored) == list(range(1, len(stored) + 1)), "sequence numbers must be contiguous"
    for seq, tag in acks.items():
        assert stored.get(seq) == tag, f"acknowledged event {seq} ({tag}) lost"
    view = led.projection()
    for ckpt in view.checkpoints.values():
        if ckpt.status == "committed":
            assert {s.rank for s in ckpt.shards} >= set(ckpt.ranks), f"{ckpt.checkpoint_id} committed without all ranks"
    if view.resume is not None:
        assert view.resume.status == "committed"
        for shard in view.resume.shards:
            led.blobs.verify(shard.location, shard.hash, shard.bytes)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", sorted(p for p in CRASH_POINTS if not p.startswith(("trainer.", "store."))))
@pytest.mark.parametrize("occurrence", [1, 3])
def test_crash_then_recover(tmp_path, point, occurrence, crash_counter):
    run_dir = tmp_path / "run"
    crashed = run_writer(run_dir, f"{point}:{occurrence}")
    assert crashed.returncode == -signal.SIGKILL, f"crash point {point} never fired: {crashed.stderr[-500:]}"
    crash_counter("crash_points")
    check_invariants(run_dir, acknowledged(crashed.stdout))

    # Restart: a new attempt resumes from the projection and completes the run.
    recovered = run_writer(run_dir, None)
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    check_invariants(run_dir, {**acknowledged(crashed.stdout), **acknowledged(recovered.stdout)})
    view = Ledger.open(run_dir, read_only=True).projection()
    assert view.resume.step == 10 * CHECKPOINTS
    assert view.attempts[-1].status == "completed"
    # Retention (keep-last 2) finished whatever the crash interrupted.
    remaining = [c for c in view.checkpoints.values() if c.status == "committed"]
    assert [c.step for c in remaining] == [40, 50]
    for ckpt in view.checkpoints.values():
        assert ckpt.status in ("committed", "deleted"), f"{ckpt.checkpoint_id} left {ckpt.status}"
        if ckpt.status == "deleted":
            assert ckpt.deletion_done and not any(led_blobs_exist(run_dir, s.location) for s in ckpt.shards)


def led_blobs_exist(run_dir: Path, location: str) -> bool:
    return (run_dir / location).exists()


def test_crash_once_fires_only_in_the_process_that_creates_the_marker(tmp_path):
    """``CKPT_LEDGER_CRASH_ONCE``: a restarted process (same environment) runs past the point."""
    marker = tmp_path / "crashed"
    script = "from ledger.faults import crash_point; crash_point('trainer.after_step'); print('ran past')"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CKPT_LEDGER_CRASH_AT": "trainer.after_step",
           "CKPT_LEDGER_CRASH_ONCE": str(marker)}
    first, second = (subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                    timeout=60) for _ in range(2))
    assert first.returncode == -signal.SIGKILL and marker.exists()
    assert second.returncode == 0 and second.stdout.strip() == "ran past"
