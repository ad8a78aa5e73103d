"""Damaged ledger files are detected before anything is loaded, and never modified or recreated."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ledger import CorruptLedgerError, Ledger, SchemaTooNewError, UnknownEventError
from ledger.events import ShardWritten, StepCompleted
from ledger.store import raw

ROOT = Path(__file__).resolve().parents[1]


def make_run(run_dir: Path, steps: int = 30) -> None:
    led = Ledger.open(run_dir)
    led.start_run(run_id="r", config={}, config_hash="h")
    attempt = led.begin_attempt()
    led.append_many([StepCompleted(step=s) for s in range(1, steps + 1)], epoch=attempt.epoch)
    cid = "ckpt-a"
    led.begin_checkpoint(checkpoint_id=cid, step=steps, ranks=[0], world_size=1, stack="ddp", epoch=attempt.epoch)
    info = led.blobs.write(f"{led.blobs.checkpoint_dir(cid, attempt.epoch)}/rank0.bin", b"x" * 100)
    led.record_shards(cid, [ShardWritten(checkpoint_id=cid, rank=0, location=info.location, bytes=info.bytes,
                                         hash=info.hash)], epoch=attempt.epoch)
    led.commit_checkpoint(cid, epoch=attempt.epoch)
    led.close()


def fingerprint(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def inspect(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "inspect", str(run_dir)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)


def truncate(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])


def append_garbage(db: Path) -> None:
    with open(db, "ab") as fh:
        fh.write(os.urandom(777))


def newer_format(db: Path) -> None:
    conn = raw.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()


def unknown_tag(db: Path) -> None:
    conn = raw.connect(db)
    conn.execute("UPDATE events SET tag = 'checkpoint.teleported' WHERE seq = 3")
    conn.commit()
    conn.close()


def newer_schema(db: Path) -> None:
    conn = raw.connect(db)
    conn.execute("UPDATE events SET schema_version = 7 WHERE seq = 4")
    conn.commit()
    conn.close()


def garbled_payload(db: Path) -> None:
    conn = raw.connect(db)
    conn.execute("UPDATE events SET payload = '{\"tag\":\"step.completed\",\"step\":\"many\"}' WHERE seq = 5")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    "damage, error, words",
    [
        (truncate, CorruptLedgerError, "not a readable"),
        (newer_format, SchemaTooNewError, "format 99"),
        (unknown_tag, UnknownEventError, "seq 3"),
        (newer_schema, SchemaTooNewError, "seq 4"),
        (garbled_payload, CorruptLedgerError, "seq 5"),
    ],
    ids=["truncated", "newer-format", "unknown-tag", "newer-event-schema", "undecodable-payload"],
)
def test_damaged_ledger_is_refused_unchanged(tmp_path, damage, error, words):
    run_dir = tmp_path / "run"
    make_run(run_dir)
    damage(run_dir / "ledger.db")
    before = fingerprint(run_dir)
    # Cached answers (the read model, snapshots) do not re-read the events they cover; everything
    # that reads the events themselves (a replay, the full state, inspect, audit) refuses the damage.
    with pytest.raises(error, match=words):
        Ledger.open(run_dir, read_only=True).projection().state
    with pytest.raises(error, match=words):
        list(Ledger.open(run_dir, read_only=True).iter_events())
    with pytest.raises(error, match=words):
        with Ledger.open(run_dir) as writer:
            writer.full_replay()
    result = inspect(run_dir)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert fingerprint(run_dir) == before


def test_garbage_appended_is_refused_by_writers(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir)
    append_garbage(run_dir / "ledger.db")
    before = fingerprint(run_dir)
    with pytest.raises(CorruptLedgerError, match="777 byte"):
        Ledger.open(run_dir)
    # Readers can still look (post-mortem), and change nothing.
    assert Ledger.open(run_dir, read_only=True).projection().resume.checkpoint_id == "ckpt-a"
    assert fingerprint(run_dir) == before


def test_missing_wal_with_committed_frames_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir)
    # Simulate a crashed writer: copy the live -wal/-shm pair while a connection holds them open.
    holder = raw.connect(run_dir / "ledger.db")
    holder.execute("PRAGMA wal_autocheckpoint = 0")
    holder.execute("INSERT INTO meta (key, value) VALUES ('probe', 'x')")
    holder.commit()
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("ledger.db", "ledger.db-shm"):  # the -wal is "lost"
        shutil.copyfile(run_dir / name, crashed / name)
    holder.close()
    before = fingerprint(crashed)
    with pytest.raises(CorruptLedgerError, match="-wal is missing"):
        Ledger.open(crashed, read_only=True)
    with pytest.raises(CorruptLedgerError, match="-wal is missing"):
        Ledger.open(crashed)
    assert inspect(crashed).returncode == 2
    assert fingerprint(crashed) == before
