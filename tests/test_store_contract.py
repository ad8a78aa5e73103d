"""The store interface contract (ledger/store/interface.py), run against every backend.

Each backend is one param of the ``store_backend`` fixture: an object whose
``open(read_only=False)`` returns a fresh :class:`~ledger.store.LedgerStore` handle on
one and the same empty ledger (per test). A new backend (PostgreSQL) adds a param;
the tests below must pass unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pytest

from ledger.errors import FencedError, LedgerError, LedgerNotFoundError
from ledger.events import AttemptStarted, CheckpointCommitted, CheckpointStarted, ShardWritten, StepCompleted
from ledger.run_address import parse_run_address
from ledger.store import (
    OPERATOR_EPOCH,
    CheckpointRow,
    EventChunk,
    LedgerStore,
    ReadModelRows,
    Snapshot,
    StoredEvent,
    StoreReader,
    open_store,
    read_consistent,
)

RM_VERSION = 7


@dataclass
class SqliteBackend:
    """``RUN_DIR/ledger.db`` in a temporary directory."""

    run_dir: Path
    opened: list[LedgerStore] = field(default_factory=list)

    def open(self, *, read_only: bool = False) -> LedgerStore:
        store = open_store(self.run_dir, read_only=read_only)
        self.opened.append(store)
        return store

    def open_missing(self) -> LedgerStore:
        return open_store(self.run_dir.parent / "nowhere", read_only=True)

    def close(self) -> None:
        for store in self.opened:
            store.close()


@dataclass
class PostgresBackend:
    """A run of its own in a ledger database shared with other runs, on a real PostgreSQL server."""

    run_url: str
    opened: list[LedgerStore] = field(default_factory=list)

    def open(self, *, read_only: bool = False) -> LedgerStore:
        store = open_store(parse_run_address(self.run_url), read_only=read_only)
        self.opened.append(store)
        return store

    def open_missing(self) -> LedgerStore:
        return open_store(parse_run_address(f"{self.run_url}-nowhere"), read_only=True)

    def close(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request, tmp_path):
    if request.param == "postgres":
        backend = PostgresBackend(request.getfixturevalue("pg_run_url"))
    else:
        backend = SqliteBackend(tmp_path / "run")
    yield backend
    backend.close()


def attempt(epoch: int) -> AttemptStarted:
    return AttemptStarted(epoch=epoch, job_id=None, slurm=None, host="h", pid=1, world_size=1, stack="ddp",
                          topology={}, resumed_from=None)


def read(store: LedgerStore, fn: Callable[[StoreReader], object]):
    return read_consistent(store, fn)


def all_events(store: LedgerStore) -> list[StoredEvent]:
    return read(store, lambda r: list(r.events()))


def steps(store: LedgerStore) -> list[int]:
    return [s.event.step for s in all_events(store) if s.tag == "step.completed"]


# -- append: contiguous seqs, fencing, idempotency, atomicity --------------------------------------

def test_seqs_are_contiguous_from_one_across_kinds_of_append(store_backend):
    store = store_backend.open()
    assert read(store, lambda r: (r.max_seq(), r.max_epoch())) == (0, 0)
    epoch, seq = store.begin_epoch(attempt)
    assert (epoch, seq) == (1, 1)
    assert store.append([StepCompleted(step=1), StepCompleted(step=2)], epoch=epoch) == [2, 3]
    assert store.append([StepCompleted(step=3)], epoch=OPERATOR_EPOCH) == [4]
    stored = all_events(store)
    assert [s.seq for s in stored] == [1, 2, 3, 4]
    assert [s.epoch for s in stored] == [1, 1, 1, OPERATOR_EPOCH]
    assert stored[0].tag == "attempt.started" and stored[0].event.epoch == 1
    assert all(s.schema_version >= 1 and s.event_id and s.recorded_at > 0 for s in stored)


def test_event_id_makes_an_append_idempotent(store_backend):
    store = store_backend.open()
    epoch, _ = store.begin_epoch(attempt)
    assert store.append([StepCompleted(step=1)], epoch=epoch, event_ids=["once"]) == [2]
    assert store.append([StepCompleted(step=99)], epoch=epoch, event_ids=["once"]) == [2]
    assert store.append([StepCompleted(step=2), StepCompleted(step=98)], epoch=epoch,
                        event_ids=["fresh", "once"]) == [3, 2]
    assert steps(store) == [1, 2]
    with pytest.raises(ValueError, match="repeats"):
        store.append([StepCompleted(step=5), StepCompleted(step=6)], epoch=epoch, event_ids=["x", "x"])
    assert steps(store) == [1, 2]


def test_a_newer_epoch_fences_older_ones_and_stores_nothing(store_backend):
    store = store_backend.open()
    old, _ = store.begin_epoch(attempt)
    store.append([StepCompleted(step=1)], epoch=old, event_ids=["landed"])
    new, _ = store.begin_epoch(attempt)
    assert (old, new) == (1, 2)
    before = read(store, lambda r: r.max_seq())
    with pytest.raises(FencedError) as err:
        store.append([StepCompleted(step=2)], epoch=old)
    assert (err.value.epoch, err.value.fenced_by) == (1, 2)
    with pytest.raises(LedgerError, match="never begun"):
        store.append([StepCompleted(step=2)], epoch=new + 1)
    assert read(store, lambda r: r.max_seq()) == before
    # A zombie's retry of something that already landed gets its seq back, not an error.
    assert store.append([StepCompleted(step=1)], epoch=old, event_ids=["landed"]) == [2]
    # Operator writes are never fenced.
    assert store.append([StepCompleted(step=3)], epoch=OPERATOR_EPOCH) == [before + 1]
    assert read(store, lambda r: r.max_epoch()) == 2


def test_fencing_holds_across_handles(store_backend):
    zombie, fresh = store_backend.open(), store_backend.open()
    old, _ = zombie.begin_epoch(attempt)
    fresh.begin_epoch(attempt)
    with pytest.raises(FencedError):
        zombie.append([StepCompleted(step=1)], epoch=old)
    # Both handles number one log.
    fresh.append([StepCompleted(step=1)], epoch=2)
    zombie.append([StepCompleted(step=2)], epoch=OPERATOR_EPOCH)
    assert [s.seq for s in all_events(fresh)] == [1, 2, 3, 4]


def test_one_append_is_all_or_nothing(store_backend):
    store = store_backend.open()
    epoch, _ = store.begin_epoch(attempt)
    with pytest.raises(ValueError):
        store.append([StepCompleted(step=1), StepCompleted(step=2, metrics={"loss": float("nan")})], epoch=epoch)
    assert read(store, lambda r: r.max_seq()) == 1


# -- checked append: the check sees the checkpoint's events inside the transaction ------------------

def started(cid: str, step: int = 10) -> CheckpointStarted:
    return CheckpointStarted(checkpoint_id=cid, step=step, ranks=[0], world_size=1, stack="ddp", topology={})


def shard(cid: str) -> ShardWritten:
    return ShardWritten(checkpoint_id=cid, rank=0, location=f"blobs/{cid}/r0", bytes=1, hash="sha256:00", codec="raw")


def test_checked_append_sees_only_its_checkpoints_events(store_backend):
    store = store_backend.open()
    epoch, _ = store.begin_epoch(attempt)
    store.append([started("a"), started("b"), shard("a"), shard("b")], epoch=epoch)
    seen: list[Sequence[StoredEvent]] = []

    def commit(about: Sequence[StoredEvent]) -> CheckpointCommitted:
        seen.append(about)
        return CheckpointCommitted(checkpoint_id="a", step=10)

    seq = store.append_checked(commit, checkpoint_id="a", epoch=epoch, event_id="a:committed")
    assert seq == 6
    assert [(s.seq, s.tag) for s in seen[0]] == [(2, "checkpoint.started"), (4, "shard.written")]
    # Stored id: make is not called again, the original seq comes back.
    assert store.append_checked(commit, checkpoint_id="a", epoch=epoch, event_id="a:committed") == 6
    assert len(seen) == 1


def test_checked_append_refusal_stores_nothing(store_backend):
    store = store_backend.open()
    epoch, _ = store.begin_epoch(attempt)

    def refuse(about: Sequence[StoredEvent]) -> CheckpointCommitted:
        raise LedgerError("not complete")

    with pytest.raises(LedgerError, match="not complete"):
        store.append_checked(refuse, checkpoint_id="a", epoch=epoch, event_id="a:committed")
    assert read(store, lambda r: r.max_seq()) == 1
    # The id was not consumed by the refused append.
    seq = store.append_checked(lambda about: CheckpointCommitted(checkpoint_id="a", step=1), checkpoint_id="a",
                               epoch=epoch, event_id="a:committed")
    assert seq == 2


def test_checked_append_is_fenced_before_the_check_runs(store_backend):
    store = store_backend.open()
    old, _ = store.begin_epoch(attempt)
    store.begin_epoch(attempt)
    called = []
    with pytest.raises(FencedError):
        store.append_checked(lambda about: called.append(1) or started("a"), checkpoint_id="a", epoch=old,
                             event_id="a:started")
    assert not called


# -- reading -------------------------------------------------------------------------------------

def test_reader_ranges_tags_limits_and_chunks_agree(store_backend):
    store = store_backend.open()
    epoch, _ = store.begin_epoch(attempt)
    store.append([StepCompleted(step=i) for i in range(1, 21)] + [started("c"), shard("c")], epoch=epoch)
    every = all_events(store)
    assert [s.seq for s in read(store, lambda r: list(r.events(after=5, until=9)))] == [6, 7, 8, 9]
    assert [s.seq for s in read(store, lambda r: list(r.events(after=5, limit=2)))] == [6, 7]
    tagged = read(store, lambda r: list(r.events(tags=["shard.written", "attempt.started"])))
    assert [s.tag for s in tagged] == ["attempt.started", "shard.written"]
    assert read(store, lambda r: list(r.events(tags=[]))) == []
    chunks = read(store, lambda r: list(r.chunks(after=3, until=20)))
    flat = [(seq, ep, ev) for c in chunks for seq, ep, ev in zip(c.seqs, c.epochs, c.events)]
    assert flat == [(s.seq, s.epoch, s.event) for s in every[3:20]]
    assert [s.seq for s in read(store, lambda r: r.checkpoint_events("c"))] == [22, 23]
    assert read(store, lambda r: r.checkpoint_events("none")) == []


def test_read_only_sees_appends_and_refuses_to_write(store_backend):
    writer = store_backend.open()
    epoch, _ = writer.begin_epoch(attempt)
    reader = store_backend.open(read_only=True)
    assert read(reader, lambda r: r.max_seq()) == 1
    writer.append([StepCompleted(step=1)], epoch=epoch)
    assert read(reader, lambda r: r.max_seq()) == 2
    with pytest.raises(LedgerError, match="read-only"):
        reader.append([StepCompleted(step=2)], epoch=OPERATOR_EPOCH)
    with pytest.raises(LedgerError, match="read-only"):
        reader.save_snapshot(Snapshot(seq=1, projection_version=1, state=b"x"))


def test_read_only_open_of_a_missing_ledger_fails(store_backend):
    with pytest.raises(LedgerNotFoundError):
        store_backend.open_missing()


def test_health_of_a_healthy_store(store_backend):
    store = store_backend.open()
    epoch, _ = store.begin_epoch(attempt)
    store.append([StepCompleted(step=1)], epoch=epoch)
    health = read(store_backend.open(read_only=True), lambda r: r.health(thorough=True))
    assert health.integrity == ["ok"]
    assert (health.events, health.first_seq, health.last_seq) == (2, 1, 2)
    assert (health.max_epoch, health.newest_event_epoch) == (1, 1)
    assert health.trailing_bytes == 0 and health.leftovers == []


# -- snapshots and the read model: stored verbatim -------------------------------------------------

def test_snapshots_are_kept_newest_first_and_found_by_seq(store_backend):
    store = store_backend.open()
    for seq in (10, 20, 30):
        store.save_snapshot(Snapshot(seq=seq, projection_version=1, state=f"s{seq}".encode()))
    store.save_snapshot(Snapshot(seq=25, projection_version=2, state=b"other version"))

    def look(r: StoreReader):
        return (r.snapshot_seq(at_most=29, projection_version=1), r.snapshot(at_most=100, projection_version=1),
                r.snapshot(at_most=5, projection_version=1))

    seq_at_29, newest, none = read(store, look)
    assert newest == Snapshot(seq=30, projection_version=1, state=b"s30")
    assert none is None
    assert seq_at_29 in (0, 20)  # 20 if the backend still keeps it; at least the newest two are kept


class RecordingMaintainer:
    """Writes one fact per append (the seq it saw) and remembers what the store asked of it."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.advanced: list[int] = []
        self.appended: list[list[tuple[int, object]]] = []
        self.discarded = 0

    def advance(self, reader: StoreReader, appended: EventChunk | None = None) -> ReadModelRows:
        seq = reader.max_seq()
        self.advanced.append(seq)
        self.appended.append([] if appended is None else list(zip(appended.seqs, appended.events)))
        if self.fail:
            raise RuntimeError("maintainer failed")
        tags = [s.tag for s in reader.events(after=seq - 1)]
        return ReadModelRows(seq=seq, version=RM_VERSION, facts={"last_tag": tags[-1].encode()},
                             checkpoints={"c": CheckpointRow(started_seq=1, step=seq, status="x", state=b"%d" % seq)},
                             attempts={1: b"a%d" % seq})

    def discard(self) -> None:
        self.discarded += 1


def test_read_model_rows_commit_with_the_append(store_backend):
    store = store_backend.open()
    maintainer = RecordingMaintainer()
    epoch, _ = store.begin_epoch(attempt, maintainer=maintainer)
    store.append([StepCompleted(step=1)], epoch=epoch, maintainer=maintainer)
    store.append_checked(lambda about: started("c"), checkpoint_id="c", epoch=epoch, event_id="c", maintainer=maintainer)
    assert maintainer.advanced == [1, 2, 3]  # called inside each transaction, after the insert
    # ``appended`` (optional for a backend) holds exactly what the transaction inserted, as stored.
    stored = [(s.seq, s.event) for s in all_events(store)]
    assert all(got in ([], [stored[i]]) for i, got in enumerate(maintainer.appended))
    other = store_backend.open(read_only=True)
    assert read(other, lambda r: (r.read_model_seq(version=RM_VERSION), r.read_model_fact("last_tag"),
                                  r.read_model_checkpoint("c"), r.read_model_attempts())) == \
        (3, b"checkpoint.started", b"3", [b"a3"])
    assert read(other, lambda r: r.read_model_seq(version=RM_VERSION + 1)) is None


def test_read_model_rolls_back_with_a_failed_append(store_backend):
    store = store_backend.open()
    good = RecordingMaintainer()
    epoch, _ = store.begin_epoch(attempt, maintainer=good)
    bad = RecordingMaintainer(fail=True)
    with pytest.raises(RuntimeError, match="maintainer failed"):
        store.append([StepCompleted(step=1)], epoch=epoch, maintainer=bad)
    assert bad.discarded == 1
    assert read(store, lambda r: (r.max_seq(), r.read_model_seq(version=RM_VERSION))) == (1, 1)
    # A fenced append never reaches the maintainer's rows either.
    store.begin_epoch(attempt)
    with pytest.raises(FencedError):
        store.append([StepCompleted(step=1)], epoch=epoch, maintainer=good)
    assert good.discarded == 1


def test_a_full_read_model_write_replaces_everything(store_backend):
    store = store_backend.open()
    store.begin_epoch(attempt, maintainer=RecordingMaintainer())
    store.write_read_model(ReadModelRows(seq=1, version=RM_VERSION, facts={"k": b"v"},
                                         checkpoints={"d": CheckpointRow(started_seq=5, step=1, status="s", state=b"d"),
                                                      "e": CheckpointRow(started_seq=4, step=1, status="s", state=b"e")},
                                         full=True))
    got = read(store, lambda r: (r.read_model_fact("last_tag"), r.read_model_fact("k"), r.read_model_checkpoints(),
                                 r.read_model_attempts()))
    assert got == (None, b"v", [b"e", b"d"], [])  # checkpoints in start order
    store.write_read_model(ReadModelRows(seq=1, version=RM_VERSION, removed_checkpoints=["e"]))
    assert read(store, lambda r: r.read_model_checkpoints()) == [b"d"]
