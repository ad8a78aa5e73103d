"""SIGKILL a real ledger writer at random moments, hundreds of times, checking every guarantee after each kill.

The writer (``workloads/kill_loop_writer.py``) is a forked process running the full
checkpoint protocol (blob writes, shard records, commit, retention) in a loop; the test
kills it after a random delay, then checks the ledger: contiguous sequence numbers, every acknowledged
append present, no committed checkpoint missing a rank, every usable checkpoint's
shards verifying, and the resume target never torn. At the end, gc cleans the
leftovers and audit reports the run healthy.

``CKPT_LEDGER_KILLS`` sets the number of kills (CI default below; set it high
for a long soak).
"""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ledger import Ledger
from ledger.audit import audit
from ledger.events import AttemptEnded
from ledger.garbage import execute_gc, plan_gc
from workloads.kill_loop_writer import POLICY

KILLS = int(os.environ.get("CKPT_LEDGER_KILLS", "800"))
ROOT = Path(__file__).resolve().parents[1]
WRITER = Path(__file__).parent / "workloads" / "kill_loop_writer.py"


class WriterForkServer:
    """A fresh interpreter that forks :func:`writer_forever` on request (see ``workloads/kill_loop_writer.py``)."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair()
        self.sock.settimeout(60)  # a wedged server fails the test instead of hanging it
        self.proc = subprocess.Popen([sys.executable, str(WRITER), str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                     env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
        theirs.close()
        self.live: int | None = None

    def _ask(self, request: str, fds: tuple[int, ...] = ()) -> str:
        socket.send_fds(self.sock, [request.encode()], fds)
        reply = self.sock.recv(4096).decode()
        assert reply, f"the writer fork server died (exit {self.proc.poll()}); see its stderr"
        return reply.split()[1]

    def spawn(self, run_dir: Path, ack_fd: int, seed: int) -> int:
        """Start a writer on ``run_dir`` acknowledging on ``ack_fd``; returns its pid."""
        self.live = int(self._ask(f"spawn {seed} {run_dir}", (ack_fd,)))
        return self.live

    def wait(self, pid: int) -> int:
        """Reap ``pid`` (only its parent, the server, can); returns the ``os.waitpid`` status."""
        status = int(self._ask(f"wait {pid}"))
        self.live = None
        return status

    def close(self) -> None:
        if self.live is not None:  # a failed check left a writer running: it loops forever otherwise
            os.kill(self.live, signal.SIGKILL)
        self.sock.close()  # EOF: the server returns
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def check(run_dir: Path, acks: dict[int, str], deep: bool, checked_up_to: list[int]) -> int | None:
    """Check every guarantee after one kill; ``checked_up_to[0]`` is the seq the last full check reached.

    Between deep checks only the events after that seq are read (reading the whole log after
    every kill made the loop quadratic in its length); a deep check reads the whole log again,
    so an acknowledged event that vanished later would still be caught.
    """
    if not (run_dir / "ledger.db").exists():
        assert not acks, "events were acknowledged but the ledger does not exist"
        return None  # killed before the (atomic) creation finished
    led = Ledger.open(run_dir, read_only=True)
    after = 0 if deep else checked_up_to[0]
    stored = {e.seq: e.tag for e in led.iter_events(after=after)}
    assert list(stored) == list(range(after + 1, after + len(stored) + 1)), "sequence numbers not contiguous"
    newest = after + len(stored)
    assert led.max_seq() == newest, "max_seq disagrees with the events read"
    lost = [(s, t) for s, t in acks.items() if s > after and stored.get(s) != t]
    assert not lost, f"acknowledged events lost: {lost[:5]}"
    checked_up_to[0] = newest
    view = led.projection()
    if deep:  # a full replay grows with the log: compare it on the periodic deep checks
        assert view.state == led.full_replay(), "snapshot+tail differs from a full replay"
    for ckpt in view.checkpoints.values():
        if ckpt.status == "committed":
            assert {s.rank for s in ckpt.shards} >= set(ckpt.ranks)
            if deep or ckpt is view.resume:
                for shard in ckpt.shards:
                    led.blobs.verify(shard.location, shard.hash, shard.bytes)
    return view.resume.step if view.resume else None


@pytest.mark.timeout(900)
def test_random_sigkill_loop(tmp_path, crash_counter):
    run_dir = tmp_path / "run"
    rng = random.Random(1234)
    acks: dict[int, str] = {}
    resume_steps = []
    checked_up_to = [0]
    server = WriterForkServer()
    try:
        for kill in range(KILLS):
            read_fd, write_fd = os.pipe()
            pid = server.spawn(run_dir, write_fd, seed=kill)
            os.close(write_fd)
            received = b""
            if rng.random() < 0.9:
                # Time the kill from the child's own progress, not the wall clock: a loaded
                # machine must not turn every kill into a kill-during-startup.
                deadline = time.monotonic() + 30
                while b"attempt.started" not in received and time.monotonic() < deadline:
                    if select.select([read_fd], [], [], 1.0)[0]:
                        received += os.read(read_fd, 65536)
            time.sleep(rng.uniform(0.0, 0.04))
            os.kill(pid, signal.SIGKILL)
            status = server.wait(pid)
            assert os.WIFSIGNALED(status), f"writer exited on its own (status {status}); see its stderr"
            with os.fdopen(read_fd, "rb") as pipe:
                received += pipe.read()
            for line in received.decode().splitlines():
                seq, tag = line.split()
                assert int(seq) not in acks, \
                    f"seq {seq} acknowledged twice: an acknowledged event was lost and its seq reused"
                acks[int(seq)] = tag
            crash_counter("kill_loop")
            resume_steps.append(check(run_dir, acks, deep=kill % 25 == 0, checked_up_to=checked_up_to))
    finally:
        server.close()
    # The run made progress across kills, and never resumed from a torn checkpoint (checked above).
    assert max(s or 0 for s in resume_steps) > 0
    # A final attempt finishes the run; the crashes' leftovers are found by audit and removed by gc.
    with Ledger.open(run_dir) as led:
        view = led.projection()
        final = led.begin_attempt(resumed_from=view.resume.checkpoint_id)
        led.append(AttemptEnded(epoch=final.epoch, reason="completed", last_step=view.resume.step), epoch=final.epoch)
    before = audit(Ledger.open(run_dir, read_only=True))
    with Ledger.open(run_dir) as led:
        execute_gc(led, plan_gc(led, POLICY))
    report = audit(Ledger.open(run_dir, read_only=True), verify_blobs=True)
    assert report.healthy, [f.message for f in report.problems]
    assert sum(f.kind == "crashed_attempt" for f in report.findings) >= KILLS // 2, "audit should list the crashes"
    assert before.findings, "the crashes left nothing for audit to find?"
