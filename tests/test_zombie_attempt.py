"""The zombie scenario with real trainer processes: a second live attempt fences the first.

The fenced attempt is shown ``fenced`` (by epoch 2) in inspect, audit and timeline; what it
left behind (its torn save, unrecorded files under its epoch directory) is collected by the
next attempt's own retention pass; afterwards ``audit`` exits 0 and ``gc`` finds nothing.
"""

from __future__ import annotations

import json
import signal

import pytest
from trainer_support import finish, kill_group, run_cli, start_cli, view_of, wait_for


@pytest.mark.timeout(900)
def test_a_fenced_attempt_is_recorded_as_fenced_and_its_leftovers_are_collected(tmp_path):
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--ckpt-every", "4", "--eval-every", "0", "--seed", "2"]
    zombie = start_cli("train", *args, "--steps", "100000")
    wait_for(lambda: len([c for c in view_of(run_dir).checkpoints.values() if c.status == "committed"]) >= 2,
             timeout=300, proc=zombie, what="the first attempt to commit twice")
    # The first job stalls (as in a long GC pause or a hung filesystem) and is requeued meanwhile:
    # a second live attempt begins on the same run; then the first one wakes up, a zombie.
    # Stop it in the middle of a save (retrying until one is caught in flight), so that it leaves a
    # torn save and unrecorded files behind when it is fenced.
    for _ in range(50):
        wait_for(lambda: any(c.status == "in_flight" for c in view_of(run_dir).checkpoints.values()),
                 timeout=120, proc=zombie, what="a save in flight")
        kill_group(zombie, signal.SIGSTOP)
        if any(c.status == "in_flight" for c in view_of(run_dir).checkpoints.values()):
            break
        kill_group(zombie, signal.SIGCONT)
    torn = [c.checkpoint_id for c in view_of(run_dir).checkpoints.values() if c.status == "in_flight"]
    assert torn, "never caught a save in flight"
    try:
        at = view_of(run_dir).resume.step
        second = start_cli("train", *args, "--steps", str(at + 48))
        wait_for(lambda: 2 in view_of(run_dir).state.attempts, timeout=300, proc=second, what="the second attempt")
    finally:
        kill_group(zombie, signal.SIGCONT)
    fenced = finish(zombie)
    done = finish(second)
    assert done.returncode == 0, done.stderr
    assert fenced.returncode == 1 and "fenced by epoch 2" in fenced.stderr, fenced.stderr

    view = view_of(run_dir)
    for cid in torn:  # collected by the second attempt itself, not by an operator's gc
        assert view.checkpoints[cid].deletion_done and "torn save of attempt 1" in view.checkpoints[cid].deletion_reason
    shown = json.loads(run_cli("inspect", str(run_dir), "--json").stdout)
    first = shown["attempts"][0]
    assert (first["status"], first["fenced_by"]) == ("fenced", 2)
    table = run_cli("inspect", str(run_dir)).stdout
    assert "fenced by epoch 2" in table
    audit = run_cli("audit", str(run_dir), "--json")
    report = json.loads(audit.stdout)
    assert audit.returncode == 0, [f["message"] for f in report["findings"] if f["severity"] == "problem"]
    assert any(f["kind"] == "fenced_attempt" and "fenced by epoch 2" in f["message"] for f in report["findings"])
    gc = json.loads(run_cli("gc", str(run_dir), "--dry-run", "--json").stdout)
    assert gc["checkpoints"] == [] and gc["files"] == [], gc
    # Every file left under the fenced attempt's directories is one its committed checkpoints recorded.
    recorded = {s.location for c in view_of(run_dir).checkpoints.values() if c.status == "committed" for s in c.shards}
    left = {str(p.relative_to(run_dir)) for p in (run_dir / "blobs").rglob("*") if p.is_file() and "/e1/" in str(p)}
    assert left <= recorded, left - recorded
    timeline = run_cli("timeline", str(run_dir), "--out", str(tmp_path / "t.svg"))
    assert timeline.returncode == 0 and "fenced by epoch 2" in (tmp_path / "t.svg").read_text()
