"""The PostgreSQL backend of :class:`~ledger.store.interface.LedgerStore`: many runs in one database.

A run is addressed as ``postgresql://USER@HOST:PORT/DB?run=NAME`` (:mod:`ledger.run_address`);
the layout is in :mod:`ledger.store.postgres_schema`.

**Fencing and seq contiguity: a row lock, not SERIALIZABLE.** Every write transaction
(``READ COMMITTED``) begins with ``SELECT max_epoch, last_seq FROM runs WHERE run = %s
FOR UPDATE``. Holding that row lock, the transaction checks the epoch, numbers its events
``last_seq + 1 ...``, inserts them, moves ``last_seq`` on and commits: the same
check-then-insert as SQLite's ``BEGIN IMMEDIATE``, but scoped to one run, so writers of
different runs never wait for each other. Writers of one run queue on the lock and never
fail for it; each statement after the lock sees everything committed before it (that is
why the level is ``READ COMMITTED``: a ``REPEATABLE READ`` snapshot would predate the
lock). ``SERIALIZABLE`` would also keep the invariants, but two appends to one run always
conflict (both read the newest seq and insert after it), so one of them would abort with a
serialization failure and have to be retried by the client, re-running the caller's check
(``append_checked``) each time; a commit racing a zombie attempt's appends would turn into
retry loops, and every read would pay for predicate locks. The lock gives the same
guarantee with no retries and plain ordering.

**Durability.** An append returns after ``COMMIT``, which (with the server's default
``synchronous_commit = on``) has flushed the WAL: an acknowledged event survives a crash
of the writer or the server. A writer killed mid-transaction leaves nothing: the server
rolls back when the connection drops, releasing the row lock.

**Read-only.** A read-only store's session has ``default_transaction_read_only = on``
(the server refuses any write in it), and each read is one ``REPEATABLE READ READ ONLY``
transaction, so everything in one :meth:`PostgresStore.read` block sees one committed
prefix of the log. A read-only open creates nothing: no schema, no run row.

**Live followers.** Each append sends ``NOTIFY ckpt_ledger, '<run>'`` in its transaction
(delivered at commit); :meth:`PostgresStore.wait_for_append` waits on it (``tail --follow``).

Every ``psycopg`` error is translated to a :class:`~ledger.errors.LedgerError` here, in
:func:`postgres_errors`, and nowhere else.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Sequence

import psycopg
from psycopg import errors as pg

from ledger.errors import (
    CorruptLedgerError,
    FencedError,
    LedgerError,
    LedgerNotFoundError,
    LedgerUnavailableError,
    LedgerWriteError,
)
from ledger.events import Event, encode, schema_of, tag_of
from ledger.faults import crash_point
from ledger.run_address import PostgresRun
from ledger.store.interface import (
    OPERATOR_EPOCH,
    MakeChecked,
    ReadModelMaintainer,
    ReadModelRows,
    Snapshot,
)
from ledger.store.log import new_event_ids
from ledger.store.postgres_reader import EVENTS, PostgresReader
from ledger.store.postgres_schema import SCHEMA, check_schema, ensure_schema

#: Snapshots kept per run: older ones are never needed (time travel replays from the closest).
SNAPSHOTS_KEPT = 2
#: A writer waits this long for another writer's lock on the same run before giving up.
LOCK_TIMEOUT_S = 30
#: The server ends a writer session idle inside a transaction this long (a frozen zombie), releasing its locks.
IDLE_IN_TRANSACTION_TIMEOUT_S = 600
#: The channel appends notify (payload: the run name).
NOTIFY_CHANNEL = "ckpt_ledger"
CONNECT_TIMEOUT_S = 10



@contextlib.contextmanager
def postgres_errors(location: str, doing: str) -> Iterator[None]:
    """Translate every ``psycopg`` error raised inside into a one-line :class:`LedgerError`."""
    try:
        yield
    except pg.LockNotAvailable as exc:
        raise LedgerError(
            f"{location}: another writer held this run's lock for {LOCK_TIMEOUT_S}s while {doing}; retry"
        ) from exc
    except (pg.InsufficientPrivilege, pg.ReadOnlySqlTransaction) as exc:
        raise LedgerWriteError(f"{location}: could not {doing}: {_first_line(exc)}; check the role's privileges") from exc
    except (pg.DiskFull, pg.OutOfMemory, pg.InsufficientResources) as exc:
        raise LedgerWriteError(f"{location}: could not {doing}: {_first_line(exc)}; the server is out of resources") from exc
    except (pg.UndefinedTable, pg.UndefinedColumn, pg.InvalidSchemaName) as exc:
        raise CorruptLedgerError(
            f"{location}: the ledger schema is incomplete ({_first_line(exc)}); restore the database from a backup"
        ) from exc
    except (pg.IntegrityError, pg.ProgrammingError) as exc:
        raise RuntimeError(f"{location}: ckpt-ledger broke a database rule while {doing} ({_first_line(exc)}); "
                           "this is a bug, please report it") from exc
    except psycopg.OperationalError as exc:
        # Connection refused or lost, server shut down or restarted, database or role missing.
        raise LedgerUnavailableError(f"{location}: could not {doing}: {_first_line(exc)}") from exc
    except psycopg.Error as exc:
        raise LedgerError(f"{location}: could not {doing}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[0].split())
    return text or type(exc).__name__


def connect(address: PostgresRun, *, read_only: bool) -> psycopg.Connection:
    """An autocommit connection (transactions are begun explicitly); libpq supplies any password.

    A read-only session refuses writes server-side; a writer session bounds lock waits
    and idle-in-transaction time (a frozen writer cannot hold a run's lock forever).
    """
    settings = {"default_transaction_read_only": "on"} if read_only else {
        "lock_timeout": f"{LOCK_TIMEOUT_S}s",
        "idle_in_transaction_session_timeout": f"{IDLE_IN_TRANSACTION_TIMEOUT_S}s",
    }
    settings["timezone"] = "UTC"
    kwargs: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "ckpt-ledger",
                              **address.connect_kwargs()}
    kwargs["options"] = " ".join(f"-c {k}={v}" for k, v in settings.items())
    with postgres_errors(str(address), "connect to the ledger database"):
        return psycopg.connect(autocommit=True, **kwargs)


def _write_read_model(conn: psycopg.Connection, run: str, rows: ReadModelRows) -> None:
    if rows.full:
        for table in ("rm_facts", "rm_checkpoints", "rm_attempts"):
            conn.execute(f"DELETE FROM {SCHEMA}.{table} WHERE run = %s", (run,))
    facts = {**rows.facts, "seq": str(rows.seq).encode(), "version": str(rows.version).encode()}
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {SCHEMA}.rm_facts (run, key, value) VALUES (%s, %s, %s) "
            "ON CONFLICT (run, key) DO UPDATE SET value = EXCLUDED.value",
            [(run, k, v) for k, v in facts.items()])
        if rows.checkpoints:
            cur.executemany(
                f"INSERT INTO {SCHEMA}.rm_checkpoints (run, checkpoint_id, started_seq, step, status, state) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (run, checkpoint_id) DO UPDATE SET "
                "started_seq = EXCLUDED.started_seq, step = EXCLUDED.step, status = EXCLUDED.status, "
                "state = EXCLUDED.state",
                [(run, cid, r.started_seq, r.step, r.status, r.state) for cid, r in rows.checkpoints.items()])
        if rows.removed_checkpoints:
            cur.execute(f"DELETE FROM {SCHEMA}.rm_checkpoints WHERE run = %s AND checkpoint_id = ANY(%s)",
                        (run, list(rows.removed_checkpoints)))
        if rows.attempts:
            cur.executemany(
                f"INSERT INTO {SCHEMA}.rm_attempts (run, epoch, state) VALUES (%s, %s, %s) "
                "ON CONFLICT (run, epoch) DO UPDATE SET state = EXCLUDED.state",
                [(run, epoch, state) for epoch, state in rows.attempts.items()])


class PostgresStore:
    """One process's handle on one run in a PostgreSQL ledger database: a writer or a read-only reader."""

    def __init__(self, address: PostgresRun, *, read_only: bool) -> None:
        if address.run is None:
            raise LedgerError(f"{address} names no run; add ?run=NAME")
        self.address = address
        self.run = address.run
        self.location = str(address)
        self.read_only = read_only
        self._lock = threading.RLock()
        self._listener: psycopg.Connection | None = None  # LISTENs for appends (wait_for_append)
        self._conn: psycopg.Connection | None = connect(address, read_only=read_only)
        try:
            with postgres_errors(self.location, "open the ledger"):
                if read_only:
                    self._check_run_exists()
                else:
                    ensure_schema(self._conn, address.database_url)
                    self._conn.execute(
                        f"INSERT INTO {SCHEMA}.runs (run, created_at) VALUES (%s, %s) ON CONFLICT (run) DO NOTHING",
                        (self.run, time.time()))
        except BaseException:
            self.close()
            raise

    def _check_run_exists(self) -> None:
        conn = self._live_conn()
        with conn.transaction():
            check_schema(conn, self.address.database_url)
            exists = conn.execute(f"SELECT 1 FROM {SCHEMA}.runs WHERE run = %s", (self.run,)).fetchone()
        if not exists:
            raise LedgerNotFoundError(
                f"no run {self.run!r} in {self.address.database_url}; list the runs with "
                f"`ckpt-ledger runs {self.address.database_url}`"
            )

    def close(self) -> None:
        """Close the connection. Idempotent."""
        with self._lock:
            for conn in (self._conn, self._listener):
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
            self._conn = self._listener = None

    def _live_conn(self) -> psycopg.Connection:
        if self._conn is None:
            if not self.read_only:
                raise LedgerError(f"{self.location}: the ledger was closed; open it again")
            # Like SQLite's read-only handle, a closed reader still reads (a view's lazy parts): reconnect.
            self._conn = connect(self.address, read_only=True)
        return self._conn

    # -- reading ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self, doing: str = "read the ledger") -> Iterator[PostgresReader]:
        """One consistent read transaction (``REPEATABLE READ READ ONLY``)."""
        with self._lock, postgres_errors(self.location, doing):
            conn = self._live_conn()
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield PostgresReader(conn, self.run, self.location)
            except BaseException:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def wait_for_append(self, timeout: float) -> None:
        """Block until an append to this run commits or ``timeout`` seconds pass (whichever is first).

        LISTEN/NOTIFY on a connection of its own (notifications queue there while this
        handle reads). The first call only starts listening and returns at once, so the
        caller's next read covers anything committed before the LISTEN.
        """
        with postgres_errors(self.location, "wait for new events"):
            if self._listener is None:
                self._listener = connect(self.address, read_only=True)
                self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
                return
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                for note in self._listener.notifies(timeout=left, stop_after=1):
                    if note.payload == self.run:
                        return

    # -- writing ------------------------------------------------------------------------------

    def _writer_conn(self) -> psycopg.Connection:
        if self.read_only:
            raise LedgerError(f"{self.location} was opened read-only; open it with read_only=False to append")
        return self._live_conn()

    @contextlib.contextmanager
    def _transaction(self, doing: str, maintainer: ReadModelMaintainer | None = None
                     ) -> Iterator[tuple[psycopg.Connection, int, int]]:
        """A write transaction holding the run row's lock; yields ``(conn, max_epoch, last_seq)``."""
        with self._lock, postgres_errors(self.location, doing):
            conn = self._writer_conn()
            conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            try:
                row = conn.execute(f"SELECT max_epoch, last_seq FROM {SCHEMA}.runs WHERE run = %s FOR UPDATE",
                                   (self.run,)).fetchone()
                if row is None:
                    raise CorruptLedgerError(f"{self.location}: the run's row is gone from {SCHEMA}.runs; "
                                             "restore the database from a backup")
                yield conn, row[0], row[1]
                if maintainer is not None:
                    rows = maintainer.advance(PostgresReader(conn, self.run, self.location))
                    if rows is not None:
                        _write_read_model(conn, self.run, rows)
                crash_point("store.before_commit")
            except BaseException:
                if maintainer is not None:
                    maintainer.discard()
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                if maintainer is not None:
                    maintainer.discard()
                raise

    def _fence(self, epoch: int, max_epoch: int) -> None:
        if epoch == OPERATOR_EPOCH:
            return
        if epoch < max_epoch:
            raise FencedError(
                f"{self.location}: attempt epoch {epoch} was fenced by epoch {max_epoch} (a newer attempt started); "
                "this job must stop",
                epoch=epoch,
                fenced_by=max_epoch,
            )
        if epoch > max_epoch:
            raise LedgerError(f"{self.location}: epoch {epoch} was never begun (newest is {max_epoch}); "
                              "call begin_attempt")

    def _insert(self, conn: psycopg.Connection, last_seq: int, items: Sequence[tuple[Event, str]],
                epoch: int, *, max_epoch: int | None = None) -> list[int]:
        seqs = list(range(last_seq + 1, last_seq + 1 + len(items)))
        tags = [tag_of(event) for event, _ in items]
        # One statement whatever the batch size: the columns travel as (binary) arrays and unnest into rows.
        conn.execute(
            f"INSERT INTO {EVENTS} (run, seq, event_id, epoch, recorded_at, tag, schema_version, checkpoint_id, "
            "payload) SELECT %s, seq, event_id, %s, %s, tag, schema_version, checkpoint_id, payload::json "
            "FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::int[], %b::text[], %b::text[]) "
            "AS e(seq, event_id, tag, schema_version, checkpoint_id, payload)",
            (self.run, epoch, time.time(), seqs, [event_id for _, event_id in items], tags,
             [schema_of(tag) for tag in tags], [getattr(event, "checkpoint_id", None) for event, _ in items],
             [encode(event).decode() for event, _ in items]))
        if max_epoch is None:
            conn.execute(f"UPDATE {SCHEMA}.runs SET last_seq = %s WHERE run = %s", (seqs[-1], self.run))
        else:
            conn.execute(f"UPDATE {SCHEMA}.runs SET last_seq = %s, max_epoch = %s WHERE run = %s",
                         (seqs[-1], max_epoch, self.run))
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, self.run))
        return seqs

    def append(self, events: Sequence[Event], *, epoch: int, event_ids: Sequence[str | None] | None = None,
               maintainer: ReadModelMaintainer | None = None) -> list[int]:
        """See :meth:`ledger.store.interface.LedgerStore.append`."""
        given = list(event_ids) if event_ids is not None else [None] * len(events)
        if len(given) != len(events):
            raise ValueError("event_ids must match events one to one")
        supplied = [i for i in given if i]
        minted = iter(new_event_ids(len(given) - len(supplied)))
        ids = [i or next(minted) for i in given]
        if len(set(ids)) != len(ids):
            raise ValueError("an event id repeats within one append; give each event its own id")
        with self._transaction(f"append {len(events)} event(s)", maintainer) as (conn, max_epoch, last_seq):
            existing = PostgresReader(conn, self.run, self.location).stored_ids(supplied)
            fresh = [(e, i) for e, i in zip(events, ids) if i not in existing]
            if fresh:
                self._fence(epoch, max_epoch)
                existing.update(zip((i for _, i in fresh), self._insert(conn, last_seq, fresh, epoch)))
            return [existing[i] for i in ids]

    def append_checked(self, make: MakeChecked, *, checkpoint_id: str, epoch: int, event_id: str,
                       maintainer: ReadModelMaintainer | None = None) -> int:
        """See :meth:`ledger.store.interface.LedgerStore.append_checked`."""
        with self._transaction("append an event", maintainer) as (conn, max_epoch, last_seq):
            reader = PostgresReader(conn, self.run, self.location)
            stored = reader.stored_ids([event_id])
            if stored:
                return stored[event_id]
            self._fence(epoch, max_epoch)
            event = make(reader.checkpoint_events(checkpoint_id))
            return self._insert(conn, last_seq, [(event, event_id)], epoch)[0]

    def begin_epoch(self, make: Callable[[int], Event], *, event_id: str | None = None,
                    maintainer: ReadModelMaintainer | None = None) -> tuple[int, int]:
        """See :meth:`ledger.store.interface.LedgerStore.begin_epoch`."""
        with self._transaction("begin an attempt", maintainer) as (conn, max_epoch, last_seq):
            epoch = max_epoch + 1
            (seq,) = self._insert(conn, last_seq, [(make(epoch), event_id or uuid.uuid4().hex)], epoch,
                                  max_epoch=epoch)
            return epoch, seq

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store a materialized projection covering this run's events up to ``snapshot.seq``."""
        with self._transaction("save a projection snapshot") as (conn, _, _):
            conn.execute(
                f"INSERT INTO {SCHEMA}.snapshots (run, seq, projection_version, state) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (run, seq) DO UPDATE SET projection_version = EXCLUDED.projection_version, "
                "state = EXCLUDED.state",
                (self.run, snapshot.seq, snapshot.projection_version, snapshot.state))
            conn.execute(
                f"DELETE FROM {SCHEMA}.snapshots WHERE run = %s AND seq NOT IN "
                f"(SELECT seq FROM {SCHEMA}.snapshots WHERE run = %s ORDER BY seq DESC LIMIT %s)",
                (self.run, self.run, SNAPSHOTS_KEPT))

    def write_read_model(self, rows: ReadModelRows) -> None:
        """Write read-model rows in their own transaction (a rebuild on open)."""
        with self._transaction("rebuild the read model") as (conn, _, _):
            _write_read_model(conn, self.run, rows)
