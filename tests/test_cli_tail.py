"""``ckpt-ledger tail``: the newest events, and ``--follow`` on a log another process is appending to."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from click.testing import CliRunner

from cli.main import cli
from runs import REPO_ROOT, build_healthy_run, cli_argv, cli_env

APPENDER = """
import sys, time
from ledger import Ledger
from ledger.events import StepCompleted
led = Ledger.open(sys.argv[1])
attempt = led.begin_attempt(job_id="appender")
for step in range(1000, 1005):
    led.append(StepCompleted(step=step, metrics={"loss": 0.5}), epoch=attempt.epoch)
    time.sleep(0.2)
led.close()
"""


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_tail_prints_the_newest_events_like_replay(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    tail = invoke("tail", info.run_dir, "-n", "3")
    replay = invoke("replay", info.run_dir)
    assert tail.exit_code == 0
    assert tail.stdout.splitlines() == replay.stdout.splitlines()[-3:]
    default = invoke("tail", info.run_dir).stdout.splitlines()
    assert len(default) == 10 and default[-1].split()[0] == "42"
    as_json = [json.loads(line) for line in invoke("tail", info.run_dir, "-n", "2", "--json").stdout.splitlines()]
    assert [r["seq"] for r in as_json] == [41, 42]
    assert invoke("tail", info.run_dir, "-n", "0").stdout == ""


def _reader(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)


def test_follow_sees_another_process_append_and_ctrl_c_exits_zero(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    tail = subprocess.Popen(cli_argv("tail", info.run_dir, "--follow", "-n", "1"), env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(tail.stdout, lines), daemon=True).start()
    appender = None
    try:
        first = lines.get(timeout=60)
        assert first.split()[0] == "42"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        appender = subprocess.Popen([sys.executable, "-c", APPENDER, str(info.run_dir)], env=env)
        seen = []
        deadline = time.monotonic() + 60
        while len([s for s in seen if "step.completed" in s]) < 5 and time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                break
        assert appender.wait(timeout=60) == 0
        steps = [json.loads(s.split("step=")[1].split()[0]) for s in seen if "step.completed" in s]
        assert steps == [1000, 1001, 1002, 1003, 1004], seen
        assert "attempt.started" in seen[0]
        assert [int(s.split()[0]) for s in seen] == list(range(43, 43 + len(seen)))  # nothing missed or repeated
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=30) == 0
        assert tail.stderr.read() == ""
    finally:
        for proc in (tail, appender):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
