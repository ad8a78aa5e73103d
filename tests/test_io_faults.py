"""I/O faults injected at the system-call level (an LD_PRELOAD shim) into a real writer process.

Documented behaviour (docs/reliability.md): a shard write, fsync or rename that
fails aborts that checkpoint with the error as its reason — it is never retried
hoping the data made it — and the writer stops with a one-line error. A ledger
append that fails (disk full, fsync error) is not acknowledged; the ledger stays
intact and every acknowledged event survives.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ledger import Ledger
from ledger.store import raw

ROOT = Path(__file__).resolve().parents[1]
SHIM_SOURCE = Path(__file__).parent / "faultlib" / "fault_inject.c"
WORKLOAD = Path(__file__).parent / "workloads" / "faulty_checkpoint.py"


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler to build the fault-injection shim")
    out = tmp_path_factory.mktemp("shim") / "fault_inject.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(out), str(SHIM_SOURCE), "-ldl"], check=True)
    return out


def run_faulty(shim: Path, run_dir: Path, op: str, err: int, match: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LD_PRELOAD": str(shim), "FAULT_OP": op,
           "FAULT_ERRNO": str(err), "FAULT_MATCH": match}
    env.pop("FAULT_ARMED", None)
    return subprocess.run([sys.executable, str(WORKLOAD), str(run_dir)], env=env, capture_output=True, text=True,
                          timeout=120)


def acknowledged(stdout: str) -> dict[int, str]:
    return {int(p[1]): p[2] for p in (line.split() for line in stdout.splitlines()) if p and p[0] == "ack"}


def check_ledger_intact(run_dir: Path, acks: dict[int, str]) -> Ledger:
    conn = raw.connect(f"file:{run_dir / 'ledger.db'}?mode=ro", uri=True)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    led = Ledger.open(run_dir, read_only=True)
    stored = {e.seq: e.tag for e in led.events()}
    assert list(stored) == list(range(1, len(stored) + 1))
    for seq, tag in acks.items():
        assert stored.get(seq) == tag, f"acknowledged event {seq} ({tag}) lost"
    return led


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "op, err",
    [("fsync", errno.EIO), ("write", errno.ENOSPC), ("rename", errno.EIO)],
    ids=["shard-fsync-EIO", "shard-write-ENOSPC", "shard-rename-EIO"],
)
def test_shard_fault_aborts_checkpoint_and_keeps_previous(shim, tmp_path, op, err):
    run_dir = tmp_path / "run"
    result = run_faulty(shim, run_dir, op, err, "/blobs/ckpt-000020")
    assert result.returncode == 3, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and os.strerror(err) in result.stderr
    led = check_ledger_intact(run_dir, acknowledged(result.stdout))
    view = led.projection()
    failed = view.checkpoints["ckpt-000020-e1"]
    assert failed.status == "aborted" and os.strerror(err) in failed.abort_reason
    assert failed.shards == []
    assert view.resume.checkpoint_id == "ckpt-000010-e1"
    # Nothing was left at (or renamed into) the failed checkpoint's final location.
    failed_dir = run_dir / "blobs" / "ckpt-000020-e1"
    assert not failed_dir.exists() or not any(p.is_file() and not p.name.endswith(".tmp")
                                              for p in failed_dir.rglob("*"))
    assert not list(failed_dir.rglob("*.tmp")) if failed_dir.exists() else True


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "op, err", [("write", errno.ENOSPC), ("fsync", errno.EIO)], ids=["ledger-append-ENOSPC", "ledger-fsync-EIO"]
)
def test_ledger_append_fault_is_not_acknowledged(shim, tmp_path, op, err):
    run_dir = tmp_path / "run"
    result = run_faulty(shim, run_dir, op, err, "ledger.db-wal")
    assert result.returncode == 3, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert "check disk space" in result.stderr
    led = check_ledger_intact(run_dir, acknowledged(result.stdout))
    view = led.projection()
    assert view.resume is not None and view.resume.checkpoint_id == "ckpt-000010-e1"
    for shard in view.resume.shards:
        led.blobs.verify(shard.location, shard.hash, shard.bytes)
    # The run can continue: a new writer appends normally (space is back).
    writer = Ledger.open(run_dir)
    attempt = writer.begin_attempt(resumed_from=view.resume.checkpoint_id)
    assert attempt.epoch == 2
    writer.close()
