"""Two real processes appending to one run: the newer attempt fences the older one, nothing is lost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from ledger import Ledger
from ledger.events import StepCompleted

ROOT = Path(__file__).resolve().parents[1]

# Appends as fast as it can; reports every acknowledged seq; exits 3 on FencedError (after checking
# the refused append left no trace), 4 on any other error (e.g. an SQLITE_BUSY surfacing).
_WORKER = textwrap.dedent(
    """
    import json, sys, time
    from ledger import FencedError, Ledger, LedgerError
    from ledger.events import StepCompleted
    run_dir, name, go, started = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    led = Ledger.open(run_dir)
    attempt = led.begin_attempt(job_id=name)
    out = {"name": name, "epoch": attempt.epoch, "acked": [attempt.seq], "fenced": None}
    open(started, "w").close()
    deadline = time.monotonic() + 60
    while not __import__("os").path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.001)
    step = 0
    try:
        while step < int(sys.argv[5]):
            step += 1
            out["acked"].append(led.append(StepCompleted(step=step, metrics={name: 1.0}), epoch=attempt.epoch,
                                           event_id=f"{name}-{step}"))
    except FencedError as err:
        out["fenced"] = {"step": step, "by": err.fenced_by}
        print(json.dumps(out), flush=True)
        sys.exit(3)
    except LedgerError as err:
        out["error"] = str(err)
        print(json.dumps(out), flush=True)
        sys.exit(4)
    print(json.dumps(out), flush=True)
    """
)


def _spawn(run_dir: Path, name: str, go: Path, started: Path, steps: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(run_dir), name, str(go), str(started), str(steps)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    import time
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None, "worker died before starting"
        assert time.monotonic() < deadline, "worker did not start"
        time.sleep(0.01)


def test_newer_attempt_fences_the_older_writer_and_nothing_is_lost(run_dir):
    Ledger.open(run_dir).close()
    go = run_dir / "go"
    first = _spawn(run_dir, "old", go, run_dir / "started-old", steps=100_000)  # runs until fenced
    _wait_for(run_dir / "started-old", first)
    go.touch()  # the old attempt starts appending ...
    # ... and while it does, a second process begins a newer attempt and appends concurrently.
    second = _spawn(run_dir, "new", run_dir / "go", run_dir / "started-new", steps=300)
    out_new, _ = second.communicate(timeout=120)
    out_old, _ = first.communicate(timeout=120)
    assert second.returncode == 0, out_new
    assert first.returncode == 3, out_old  # fenced, not a busy error (4) and not finished (0)
    old, new = json.loads(out_old), json.loads(out_new)
    assert (old["epoch"], new["epoch"]) == (1, 2)
    assert old["fenced"]["by"] == 2
    assert len(old["acked"]) > 1  # it really was appending when the newer attempt began

    stored = Ledger.open(run_dir, read_only=True).events()
    assert [s.seq for s in stored] == list(range(1, len(stored) + 1))  # contiguous
    by_seq = {s.seq: s for s in stored}
    for worker in (old, new):  # every acknowledged append of both is present, as acknowledged
        for seq in worker["acked"]:
            assert by_seq[seq].epoch == worker["epoch"]
    assert len(stored) == len(old["acked"]) + len(new["acked"])  # and nothing else: the refused append left no trace
    fenced_step = old["fenced"]["step"]
    assert f"old-{fenced_step}" not in {s.event_id for s in stored}
    # The old writer's appends all precede the new attempt's start; none landed after it.
    new_start = min(new["acked"])
    assert max(old["acked"]) < new_start
    assert by_seq[new_start].tag == "attempt.started"
    assert all(s.epoch == 2 for s in stored if s.seq > new_start)


def test_two_writers_of_the_same_attempt_interleave_without_busy_errors(run_dir):
    # Same epoch from two processes (e.g. two ranks writing shards): both succeed, every seq contiguous.
    with Ledger.open(run_dir) as led:
        epoch = led.begin_attempt().epoch
    script = textwrap.dedent(
        f"""
        import json, sys
        from ledger import Ledger
        from ledger.events import StepCompleted
        led = Ledger.open(sys.argv[1])
        print(json.dumps([led.append(StepCompleted(step=i), epoch={epoch}) for i in range(200)]))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    acked = sorted(json.loads(outs[0]) + json.loads(outs[1]))
    assert acked == list(range(2, 402))
    assert [s.seq for s in Ledger.open(run_dir, read_only=True).events()] == list(range(1, 402))
    assert isinstance(Ledger.open(run_dir, read_only=True).events()[-1].event, StepCompleted)
