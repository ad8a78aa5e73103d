"""``ckpt-ledger train`` draws an upload bar on a terminal only, and its step lines stay whole lines.

The job runs on a real pseudo-terminal (``pty.openpty``) as a person would see it, with
stdout and stderr both on it, its checkpoints going to the real S3 server; the same job
piped draws nothing.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from trainer_support import REPO, cli_env, run_cli

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(600)]

SHORT = ["--steps", "20", "--ckpt-every", "10", "--eval-every", "10"]


def on_a_terminal(argv: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run ``python ARGV`` with stdout and stderr on a pseudo-terminal; (exit code, what it drew)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=cli_env(),
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, start_new_session=True)
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the last process holding it
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    return proc.wait(timeout=timeout), drawn.decode(errors="replace")


def test_train_draws_an_upload_bar_on_a_terminal_and_keeps_step_lines_whole(tmp_path, s3_env):
    code, drawn = on_a_terminal(["-m", "cli", "train", "--run-dir", str(tmp_path / "run"), "--blobs", f"{s3_env}/bar",
                                 "--nproc", "2", *SHORT])
    assert code == 0, drawn
    assert "uploading step000010-e1" in drawn and "uploading step000020-e1" in drawn, drawn
    assert re.search(r"uploading step000010-e1: +\d+%\|.*\d[kMG]?\b.*B/s\]", drawn), drawn  # a tqdm bytes bar
    # Both ranks upload their own file; only rank 0 draws, so each bar starts (at 0%) once.
    assert len(re.findall(r"uploading step000010-e1: +0%", drawn)) == 1, drawn
    # Step lines printed while a background upload draws its bar are whole lines, never glued onto the bar.
    pieces = re.split(r"[\r\n]", drawn)
    steps = [p for p in pieces if "loss" in p and "step" in p]
    assert steps and all(p.startswith("[ckpt-ledger] step ") for p in steps), steps


def test_train_draws_no_bar_when_piped(tmp_path, s3_env):
    done = run_cli("train", "--run-dir", str(tmp_path / "run"), "--blobs", f"{s3_env}/nobar", *SHORT,
                   timeout=300)
    assert done.returncode == 0, done.stderr
    assert "uploading" not in done.stderr and "uploading" not in done.stdout
    assert "\r" not in done.stderr + done.stdout
    assert "[ckpt-ledger] checkpoint step000020-e1 committed" in done.stdout


# Another thread prints whole lines while the bar is drawn: as a training loop does during a background upload.
_LINES_WHILE_A_BAR_IS_DRAWN = """
import threading, time
from ledger.progress import byte_progress
with byte_progress("uploading demo", True) as progress:
    progress(1 << 20, 4 << 20)
    def loop():
        for n in range(3):
            print(f"line {n} of the loop", end="")
            print()
            time.sleep(0.15)
    t = threading.Thread(target=loop); t.start()
    for done in range(2, 5):
        time.sleep(0.15)
        progress(done << 20, 4 << 20)
    t.join()
print("after the bar")
"""


def test_lines_printed_while_a_bar_is_drawn_stay_whole_and_the_bar_comes_back():
    code, drawn = on_a_terminal(["-c", _LINES_WHILE_A_BAR_IS_DRAWN], timeout=60)
    assert code == 0, drawn
    pieces = re.split(r"[\r\n]", drawn)
    assert [p for p in pieces if "of the loop" in p] == [f"line {n} of the loop" for n in range(3)], drawn
    assert "after the bar" in pieces
    assert any("uploading demo:" in p and "%|" in p for p in pieces[pieces.index("line 2 of the loop"):]), drawn
