"""The SQLite event log: contiguous seqs, idempotent and fenced appends, format marker, side-effect-free reads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ledger import (
    CorruptLedgerError,
    FencedError,
    Ledger,
    LedgerError,
    LedgerNotFoundError,
    SchemaTooNewError,
)
from ledger.events import CheckpointPinned, StepCompleted
from ledger.store import APPLICATION_ID, LEDGER_FORMAT, raw


def test_seqs_are_contiguous_from_one(run_dir):
    with Ledger.open(run_dir) as led:
        attempt = led.begin_attempt()
        seqs = [led.append(StepCompleted(step=i), epoch=attempt.epoch) for i in range(5)]
        seqs += led.append_many([StepCompleted(step=9), StepCompleted(step=10)], epoch=attempt.epoch)
    assert [attempt.seq, *seqs] == list(range(1, 9))
    assert [s.seq for s in Ledger.open(run_dir, read_only=True).events()] == list(range(1, 9))


def test_envelope_fields_are_kept(run_dir):
    with Ledger.open(run_dir) as led:
        attempt = led.begin_attempt()
        led.append(StepCompleted(step=1), epoch=attempt.epoch, event_id="step-1")
        led.append(CheckpointPinned(checkpoint_id="c"))  # operator write: epoch 0
    first, second, third = Ledger.open(run_dir, read_only=True).events()
    assert (first.tag, first.epoch, first.schema_version) == ("attempt.started", 1, 1)
    assert (second.event_id, second.epoch, second.tag) == ("step-1", 1, "step.completed")
    assert (third.epoch, third.tag) == (0, "checkpoint.pinned")
    assert first.recorded_at <= second.recorded_at <= third.recorded_at


def test_duplicate_event_id_is_a_no_op_returning_the_original_seq(run_dir):
    with Ledger.open(run_dir) as led:
        attempt = led.begin_attempt()
        first = led.append(StepCompleted(step=1), epoch=attempt.epoch, event_id="once")
        led.append(StepCompleted(step=2), epoch=attempt.epoch)
        again = led.append(StepCompleted(step=99), epoch=attempt.epoch, event_id="once")
        batch = led.append_many([StepCompleted(step=3), StepCompleted(step=1)], epoch=attempt.epoch,
                                event_ids=["new", "once"])
        assert (first, again) == (2, 2)
        assert batch == [4, 2]
        assert [s.event.step for s in led.events(tags=["step.completed"])] == [1, 2, 3]


def test_duplicate_event_id_from_a_fenced_writer_is_still_a_no_op(run_dir):
    # A zombie retrying an append that did land gets the original seq, not an error.
    with Ledger.open(run_dir) as led:
        old = led.begin_attempt()
        seq = led.append(StepCompleted(step=1), epoch=old.epoch, event_id="s1")
        led.begin_attempt()
        assert led.append(StepCompleted(step=1), epoch=old.epoch, event_id="s1") == seq


def test_fenced_append_writes_nothing(run_dir):
    with Ledger.open(run_dir) as led:
        old = led.begin_attempt()
        new = led.begin_attempt()
        before = led.events()
        with pytest.raises(FencedError, match="fenced by epoch 2") as caught:
            led.append_many([StepCompleted(step=1), StepCompleted(step=2)], epoch=old.epoch)
        assert (caught.value.epoch, caught.value.fenced_by) == (1, 2)
        with pytest.raises(FencedError):
            led.begin_checkpoint(checkpoint_id="c", step=1, ranks=[0], world_size=1, stack="ddp", epoch=old.epoch)
        with pytest.raises(FencedError):
            led.commit_checkpoint("c", epoch=old.epoch)
        assert led.events() == before
        assert led.append(StepCompleted(step=1), epoch=new.epoch) == len(before) + 1


def test_unbegun_epoch_is_refused(run_dir):
    with Ledger.open(run_dir) as led:
        led.begin_attempt()
        with pytest.raises(LedgerError, match="never begun"):
            led.append(StepCompleted(step=1), epoch=5)
        assert led.max_seq() == 1


def test_writer_sets_wal_and_synchronous_full(run_dir):
    with Ledger.open(run_dir) as led:
        settings = led.store.connection_settings()  # the writer's own connection: these are per-connection settings
        assert settings["journal_mode"] == "wal"
        assert settings["synchronous"] == 2  # FULL
        assert settings["busy_timeout"] >= 1000
    with raw.connect(run_dir / "ledger.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == LEDGER_FORMAT
    conn.close()


# -- the format marker: foreign, garbage, newer and empty files are refused and left untouched ------------------


def _foreign_sqlite(path: Path) -> None:
    conn = raw.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('ada')")
    conn.commit()
    conn.close()


def _newer_ledger(path: Path) -> None:
    Ledger.open(path.parent).close()
    conn = raw.connect(path)
    conn.execute(f"PRAGMA user_version = {LEDGER_FORMAT + 1}")
    conn.close()


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database\n" * 300)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("make", "error"),
    [(_foreign_sqlite, CorruptLedgerError), (_garbage, CorruptLedgerError), (_newer_ledger, SchemaTooNewError),
     (_empty, CorruptLedgerError)],
    ids=["foreign-sqlite", "garbage", "newer-format", "empty"],
)
@pytest.mark.parametrize("read_only", [False, True], ids=["writer", "reader"])
def test_unusable_files_are_refused_and_not_modified(run_dir, snapshot_files, make, error, read_only):
    run_dir.mkdir()
    make(run_dir / "ledger.db")
    before = snapshot_files(run_dir)
    with pytest.raises(error, match="ledger.db"):
        Ledger.open(run_dir, read_only=read_only)
    assert snapshot_files(run_dir) == before


def test_read_only_open_of_a_missing_dir_raises_and_creates_nothing(tmp_path):
    missing = tmp_path / "nope" / "run"
    with pytest.raises(LedgerNotFoundError, match="no ledger"):
        Ledger.open(missing, read_only=True)
    with pytest.raises(FileNotFoundError):
        Ledger.open(missing, read_only=True)
    assert list(tmp_path.iterdir()) == []


def test_read_only_open_of_a_dir_without_ledger_creates_nothing(tmp_path):
    with pytest.raises(LedgerNotFoundError):
        Ledger.open(tmp_path, read_only=True)
    assert list(tmp_path.iterdir()) == []


def test_read_only_ledger_cannot_append(run_dir):
    Ledger.open(run_dir).close()
    ro = Ledger.open(run_dir, read_only=True)
    with pytest.raises(LedgerError, match="read-only"):
        ro.append(StepCompleted(step=1))


def test_read_only_reads_create_no_file_on_a_quiescent_ledger(run_dir, snapshot_files):
    with Ledger.open(run_dir) as led:
        attempt = led.begin_attempt()
        led.append(StepCompleted(step=1), epoch=attempt.epoch)
    before = snapshot_files(run_dir)
    assert not (run_dir / "ledger.db-wal").exists()
    ro = Ledger.open(run_dir, read_only=True)
    assert [s.seq for s in ro.events()] == [1, 2]
    assert ro.projection().seq == 2
    assert ro.max_seq() == 2
    assert snapshot_files(run_dir) == before


_WRITER = textwrap.dedent(
    """
    import sys
    from ledger import Ledger
    from ledger.events import StepCompleted
    led = Ledger.open(sys.argv[1])
    attempt = led.begin_attempt()
    for step in range(int(sys.argv[2])):
        led.append(StepCompleted(step=step), epoch=attempt.epoch)
    print("ready", flush=True)
    sys.stdin.readline()          # hold the connection (and its -wal/-shm) open until told to stop
    led.append(StepCompleted(step=10_000), epoch=attempt.epoch)
    led.close()
    """
)


def _start_writer(run_dir: Path, steps: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(run_dir), str(steps)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_read_only_open_while_another_process_writes_creates_no_file(run_dir):
    Ledger.open(run_dir).close()
    proc = _start_writer(run_dir, 20)
    try:
        names_before = sorted(p.name for p in run_dir.iterdir())
        ro = Ledger.open(run_dir, read_only=True)
        assert [s.seq for s in ro.events()] == list(range(1, 22))
        assert ro.projection().seq == 21
        assert sorted(p.name for p in run_dir.iterdir()) == names_before
    finally:
        proc.stdin.write("go\n")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    # After the writer is gone the read-only handle sees its last append and still creates nothing.
    names_after = sorted(p.name for p in run_dir.iterdir())
    assert ro.max_seq() == 22
    assert sorted(p.name for p in run_dir.iterdir()) == names_after


def test_read_only_open_with_a_wal_but_no_shm_leaves_the_originals_alone(run_dir, tmp_path, snapshot_files):
    # A run dir copied while a writer was active: -wal present, -shm not. Reads must not create the -shm.
    Ledger.open(run_dir).close()
    proc = _start_writer(run_dir, 5)
    try:
        copy = tmp_path / "copy"
        copy.mkdir()
        for name in ("ledger.db", "ledger.db-wal"):
            (copy / name).write_bytes((run_dir / name).read_bytes())
    finally:
        proc.stdin.write("go\n")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    before = snapshot_files(copy)
    ro = Ledger.open(copy, read_only=True)
    assert [s.seq for s in ro.events()] == list(range(1, 7))
    assert snapshot_files(copy) == before


def test_writer_reopen_keeps_everything(run_dir):
    with Ledger.open(run_dir) as led:
        attempt = led.begin_attempt()
        seqs = [led.append(StepCompleted(step=i), epoch=attempt.epoch) for i in range(3)]
    with Ledger.open(run_dir) as led:
        assert [s.seq for s in led.events()] == [attempt.seq, *seqs]
        newer = led.begin_attempt()
        assert newer.epoch == attempt.epoch + 1  # the fencing token survives a reopen
        with pytest.raises(FencedError):
            led.append(StepCompleted(step=4), epoch=attempt.epoch)
