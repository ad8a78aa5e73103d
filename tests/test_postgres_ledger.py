"""The ledger on a real PostgreSQL server: addressing, schema, read-only reads, fencing, crashes, restarts."""

from __future__ import annotations

import json
import os
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
from ledger.errors import LedgerUnavailableError
from ledger.events import CheckpointPinned, StepCompleted
from ledger.run_address import RunAddressError

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("schema_version", "runs", "events", "snapshots", "rm_facts", "rm_checkpoints", "rm_attempts")


def ledger_rows(server, database: str) -> dict[str, list[tuple]]:
    """Every row of every ledger table (to prove an operation changed nothing)."""
    return {t: server.sql(database, f"SELECT * FROM ckpt_ledger.{t} ORDER BY 1, 2") for t in TABLES}


def next_xid(server) -> int:
    """The server's next transaction id: it moves only when some transaction writes."""
    return int(server.sql("postgres", "SELECT pg_snapshot_xmax(pg_current_snapshot())::text")[0][0])


def schemas(server, database: str) -> list[str]:
    return [r[0] for r in server.sql(database, "SELECT nspname FROM pg_namespace WHERE nspname = 'ckpt_ledger'")]


def steps(first: int, n: int) -> list[StepCompleted]:
    return [StepCompleted(step=s, metrics={"loss": 1.0 / s}) for s in range(first, first + n)]


def test_first_writer_open_creates_the_schema_and_runs_are_independent(pg_server, pg_database):
    db = pg_database.rsplit("/", 1)[1]
    assert schemas(pg_server, db) == []
    with Ledger.open(f"{pg_database}?run=r1") as one, Ledger.open(f"{pg_database}?run=r2") as two:
        one.start_run(run_id="r1", config={"lr": 1})
        two.start_run(run_id="r2", config={"lr": 2})
        e1 = one.begin_attempt(world_size=1, stack="ddp").epoch
        e2 = two.begin_attempt(world_size=1, stack="ddp").epoch
        assert (e1, e2) == (1, 1)  # fencing tokens are per run
        one.append_many(steps(1, 5), epoch=e1)
        two.append_many(steps(1, 2), epoch=e2)
    assert schemas(pg_server, db) == ["ckpt_ledger"]
    with Ledger.open(f"{pg_database}?run=r1", read_only=True) as r1, \
            Ledger.open(f"{pg_database}?run=r2", read_only=True) as r2:
        assert [e.seq for e in r1.events()] == list(range(1, 8))  # seqs contiguous per run
        assert [e.seq for e in r2.events()] == list(range(1, 5))
        assert r1.projection().state.run.run_id == "r1"
        assert r2.projection().state.run.run_id == "r2"
        assert r1.projection().last_step == 5 and r2.projection().last_step == 2


def test_read_only_open_creates_nothing_and_names_what_is_missing(pg_server, pg_database):
    db = pg_database.rsplit("/", 1)[1]
    with pytest.raises(LedgerNotFoundError, match="database is empty"):
        Ledger.open(f"{pg_database}?run=r1", read_only=True)
    assert schemas(pg_server, db) == []
    Ledger.open(f"{pg_database}?run=r1").close()
    before = ledger_rows(pg_server, db)
    with pytest.raises(LedgerNotFoundError, match="no run 'other'.*ckpt-ledger runs"):
        Ledger.open(f"{pg_database}?run=other", read_only=True)
    assert ledger_rows(pg_server, db) == before


def test_a_foreign_database_is_not_a_ledger_and_is_left_untouched(pg_server, pg_database):
    db = pg_database.rsplit("/", 1)[1]
    pg_server.sql(db, "CREATE TABLE customers (id int)")
    for read_only in (True, False):
        with pytest.raises(CorruptLedgerError, match="not a ckpt-ledger database") as info:
            Ledger.open(f"{pg_database}?run=r1", read_only=read_only)
        assert "\n" not in str(info.value)
    assert schemas(pg_server, db) == []


def test_a_newer_schema_is_refused_in_one_line(pg_server, pg_database):
    db = pg_database.rsplit("/", 1)[1]
    Ledger.open(f"{pg_database}?run=r1").close()
    pg_server.sql(db, "UPDATE ckpt_ledger.schema_version SET version = version + 1")
    for read_only in (True, False):
        with pytest.raises(SchemaTooNewError, match="upgrade ckpt-ledger") as info:
            Ledger.open(f"{pg_database}?run=r1", read_only=read_only)
        assert "\n" not in str(info.value)


def test_unreachable_server_and_missing_database_are_one_line_errors(pg_server):
    with pytest.raises(LedgerUnavailableError, match="does not exist") as info:
        Ledger.open(pg_server.url("no_such_db", run="r1"))
    assert "\n" not in str(info.value)
    with pytest.raises(LedgerUnavailableError, match="refused") as info:
        Ledger.open("postgresql://ckpt@127.0.0.1:1/ledger?run=r1")
    assert "\n" not in str(info.value)
    with pytest.raises(RunAddressError, match="PGPASSWORD"):
        Ledger.open(pg_server.url("postgres", run="r1").replace("ckpt@", "ckpt:hunter2@"))


def test_reads_never_write_not_even_a_transaction_id(pg_server, pg_run_url):
    db = pg_run_url.rsplit("/", 1)[1].split("?")[0]
    url = pg_run_url
    with Ledger.open(url) as led:
        led.start_run(run_id="r1", config={})
        epoch = led.begin_attempt(world_size=1, stack="ddp").epoch
        led.append_many(steps(1, 50), epoch=epoch)
    before, xid = ledger_rows(pg_server, db), next_xid(pg_server)
    with Ledger.open(url, read_only=True) as ro:
        ro.projection()
        ro.projection(at=10)
        list(ro.events(tags=["step.completed"]))
        ro.full_replay()
        with pytest.raises(LedgerError, match="read-only"):
            ro.append(CheckpointPinned(checkpoint_id="x"))
    assert next_xid(pg_server) == xid
    assert ledger_rows(pg_server, db) == before


def test_idempotent_appends_and_fencing_between_two_connections(pg_run_url):
    url = pg_run_url
    with Ledger.open(url) as old, Ledger.open(url) as new:
        e_old = old.begin_attempt(world_size=1, stack="ddp").epoch
        seq = old.append(StepCompleted(step=1, metrics={}), epoch=e_old, event_id="s1")
        assert old.append(StepCompleted(step=1, metrics={}), epoch=e_old, event_id="s1") == seq
        e_new = new.begin_attempt(world_size=1, stack="ddp").epoch
        with pytest.raises(FencedError, match=f"fenced by epoch {e_new}") as info:
            old.append(StepCompleted(step=2, metrics={}), epoch=e_old)
        assert info.value.fenced_by == e_new
        # A retry of what already landed still succeeds after the fence.
        assert old.append(StepCompleted(step=1, metrics={}), epoch=e_old, event_id="s1") == seq
        new.append(StepCompleted(step=2, metrics={}), epoch=e_new)
        assert [e.seq for e in new.events()] == [1, 2, 3, 4]


# A writer that prints every acknowledged seq, then is SIGKILLed inside its next transaction
# (crash point store.before_commit: events inserted, COMMIT not sent).
_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from ledger import Ledger
    from ledger.events import StepCompleted
    led = Ledger.open(sys.argv[1])
    epoch = led.begin_attempt(world_size=1, stack="ddp").epoch
    step = 0
    while True:
        batch = [StepCompleted(step=step + i, metrics={"loss": 0.5}) for i in range(1, 4)]
        seqs = led.append_many(batch, epoch=epoch)
        step += 3
        print(" ".join(map(str, seqs)), flush=True)
    """
)


def test_sigkill_mid_transaction_loses_no_acknowledged_event_and_leaves_no_partial_one(pg_run_url, crash_counter):
    url = pg_run_url
    # The 7th write transaction dies between INSERT and COMMIT (an append batch: see below).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CKPT_LEDGER_CRASH_AT": "store.before_commit:7"}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, url], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr
    crash_counter("postgres writer SIGKILL")
    acked = [int(s) for line in proc.stdout.splitlines() for s in line.split()]
    # Opening and begin_attempt take a transaction or two; every one after them is a batch of 3.
    assert len(acked) >= 9 and len(acked) % 3 == 0
    with Ledger.open(url, read_only=True) as ro:
        stored = list(ro.events())
    began = [e.seq for e in stored if e.tag == "attempt.started"]
    assert began == [1] and acked == list(range(2, 2 + len(acked)))
    # Every acknowledged event is there, and nothing of the batch that was inside its transaction.
    assert [e.seq for e in stored] == [1, *acked]
    assert [e.event.step for e in stored[1:]] == list(range(1, len(acked) + 1))
    with Ledger.open(url) as led:  # the dead writer's row lock is gone: a new attempt appends at once
        epoch = led.begin_attempt(world_size=1, stack="ddp").epoch
        assert led.append(StepCompleted(step=len(acked) + 1, metrics={}), epoch=epoch) == len(acked) + 3


_FENCED_WORKER = textwrap.dedent(
    """
    import json, sys, time
    from ledger import FencedError, Ledger
    from ledger.events import StepCompleted
    led = Ledger.open(sys.argv[1])
    epoch = led.begin_attempt(job_id=sys.argv[2], world_size=1, stack="ddp").epoch
    print(json.dumps({"epoch": epoch}), flush=True)
    acked, step = [], 0
    try:
        while step < int(sys.argv[3]):
            step += 1
            acked.append(led.append(StepCompleted(step=step, metrics={}), epoch=epoch, event_id=f"{epoch}-{step}"))
            time.sleep(0.002)
    except FencedError as err:
        print(json.dumps({"acked": acked, "fenced_by": err.fenced_by}), flush=True)
        sys.exit(3)
    print(json.dumps({"acked": acked}), flush=True)
    """
)


@pytest.mark.timeout(180)
def test_a_second_live_process_fences_the_first_through_the_database(pg_run_url):
    url = pg_run_url
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    old = subprocess.Popen([sys.executable, "-c", _FENCED_WORKER, url, "old", "1000000"], stdout=subprocess.PIPE,
                           text=True, env=env)
    assert json.loads(old.stdout.readline())["epoch"] == 1
    new = subprocess.run([sys.executable, "-c", _FENCED_WORKER, url, "new", "20"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert new.returncode == 0, new.stderr
    old_out = json.loads(old.stdout.readline())
    assert old.wait(timeout=60) == 3
    assert old_out["fenced_by"] == 2 and old_out["acked"]
    new_out = json.loads(new.stdout.splitlines()[-1])
    with Ledger.open(url, read_only=True) as ro:
        stored = {e.seq: e for e in ro.events()}
    # Every acknowledged append of both is stored; nothing of the old epoch after the new one began.
    assert set(old_out["acked"]) | set(new_out["acked"]) <= set(stored)
    began = next(s for s, e in stored.items() if e.tag == "attempt.started" and e.epoch == 2)
    assert all(e.epoch == 2 for s, e in stored.items() if s > began)
    assert sorted(stored) == list(range(1, len(stored) + 1))


@pytest.fixture
def own_server():
    """A server of this test's own (it gets restarted)."""
    from pg_server import PostgresServer

    server = PostgresServer()
    server.start()
    yield server
    server.destroy()


@pytest.mark.timeout(180)
def test_server_restart_mid_run_fails_the_writer_in_one_line_and_the_next_open_resumes(own_server):
    url = own_server.create_database("ledger") + "?run=r1"
    led = Ledger.open(url)
    epoch = led.begin_attempt(world_size=1, stack="ddp").epoch
    led.append_many(steps(1, 10), epoch=epoch)
    own_server.restart()
    with pytest.raises(LedgerUnavailableError) as info:
        led.append(StepCompleted(step=11, metrics={}), epoch=epoch)
    assert "\n" not in str(info.value) and "r1" in str(info.value)
    led.close()
    with Ledger.open(url) as again:
        assert again.max_seq() == 11
        epoch = again.begin_attempt(world_size=1, stack="ddp").epoch
        assert epoch == 2
        assert again.append(StepCompleted(step=11, metrics={}), epoch=epoch) == 13


def test_concurrent_writers_of_one_run_queue_on_its_lock_and_seqs_stay_contiguous(pg_shared_database):
    import threading

    url = f"{pg_shared_database}?run=concurrent"
    other = f"{pg_shared_database}?run=concurrent-neighbour"
    acked: dict[str, list[int]] = {}

    def writer(name: str, address: str) -> None:
        with Ledger.open(address) as led:
            acked[name] = [seq for i in range(25) for seq in led.append_many(steps(i * 2 + 1, 2))]

    threads = [threading.Thread(target=writer, args=(f"w{i}", url)) for i in range(4)]
    threads.append(threading.Thread(target=writer, args=("neighbour", other)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    mine = [seq for name, seqs in acked.items() if name != "neighbour" for seq in seqs]
    assert sorted(mine) == list(range(1, 4 * 50 + 1))  # every acknowledged seq distinct, no gap
    assert acked["neighbour"] == list(range(1, 51))  # another run numbers its own events from 1
    with Ledger.open(url, read_only=True) as ro:
        assert [e.seq for e in ro.events()] == list(range(1, 201))


def test_a_writer_blocked_by_another_transaction_gives_up_in_one_line(pg_run_url, monkeypatch):
    import psycopg

    import ledger.store.postgres as backend

    monkeypatch.setattr(backend, "LOCK_TIMEOUT_S", 1)  # the real bound is 30 s: same path, shorter wait
    with Ledger.open(pg_run_url) as led:
        led.append(StepCompleted(step=1, metrics={}))
        run = pg_run_url.rsplit("run=", 1)[1]
        with psycopg.connect(pg_run_url.split("?")[0]) as holder:  # a stuck writer, mid-transaction
            holder.execute("SELECT 1 FROM ckpt_ledger.runs WHERE run = %s FOR UPDATE", (run,))
            with Ledger.open(pg_run_url) as blocked:
                with pytest.raises(LedgerError, match="held this run's lock for 1s.*retry") as info:
                    blocked.append(StepCompleted(step=2, metrics={}))
                assert "\n" not in str(info.value)
        assert led.append(StepCompleted(step=2, metrics={})) == 2  # the lock is free again: nothing half-done
