"""Start N local ranks of a worker script on gloo over loopback, with a hard time limit.

Each rank is a plain subprocess with ``RANK``/``WORLD_SIZE``/``MASTER_*`` set the way
torchrun sets them; a rank still running at the deadline is killed (with the others)
and the test fails with every rank's output instead of hanging.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(**extra: str) -> dict[str, str]:
    """The environment of a test subprocess: this repo importable, one thread, loopback gloo."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), str(TESTS_DIR), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    env.update(extra)
    return env


@dataclass(frozen=True)
class RanksResult:
    """Exit codes and combined output of every rank, in rank order."""

    returncodes: list[int]
    outputs: list[str]

    def describe(self) -> str:
        return "\n".join(f"--- rank {r} exited {c}\n{o[-3000:]}" for r, (c, o) in
                         enumerate(zip(self.returncodes, self.outputs)))


def run_ranks(script: str, args: list[str], nproc: int, *, timeout: float, log_dir: Path,
              env: dict[str, str] | None = None) -> RanksResult:
    """Run ``python tests/<script> args`` as ranks 0..nproc-1 of one job; kill all of them at ``timeout``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs, logs = [], []
    for rank in range(nproc):
        log = open(log_dir / f"rank{rank}.log", "w+b")  # noqa: SIM115 - closed below
        rank_vars = rank_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_PORT=port,
                             **(env or {}))
        procs.append(subprocess.Popen([sys.executable, str(TESTS_DIR / script), *args], env=rank_vars, cwd=REPO_ROOT,
                                      stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
        outputs = [_read(log) for log in logs]
        raise AssertionError(f"{script} did not finish within {timeout:.0f}s\n"
                             + RanksResult([p.returncode for p in procs], outputs).describe()) from None
    outputs = [_read(log) for log in logs]
    return RanksResult([p.returncode for p in procs], outputs)


def _read(log) -> str:  # noqa: ANN001 - a binary file object
    log.seek(0)
    text = log.read().decode(errors="replace")
    log.close()
    return text


def run_trainer(config: dict, nproc: int, *, out: Path, timeout: float) -> dict:
    """One ``Trainer`` attempt on ``nproc`` ranks (tests/trainer_rank.py); returns what rank 0 loaded at start."""
    result = run_ranks("trainer_rank.py", ["--config", json.dumps(config), "--out", str(out)], nproc,
                       timeout=timeout, log_dir=out / "logs")
    assert result.returncodes == [0] * nproc, result.describe()
    return torch.load(out / "loaded.pt", weights_only=False)


def run_cli(args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """``ckpt-ledger ARGS`` from this checkout (``python -m cli``)."""
    return subprocess.run([sys.executable, "-m", "cli", *args], env=rank_env(), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)
