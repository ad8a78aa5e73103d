"""The SQLite backend of :class:`~ledger.store.interface.LedgerStore`: fenced, idempotent, durable
appends and side-effect-free reads of ``RUN_DIR/ledger.db`` (file format in :mod:`ledger.store.format`).

Writers use WAL, ``synchronous=FULL`` and ``BEGIN IMMEDIATE``; the fence check, the
insert and the read-model update happen in the same transaction. Readers never
create or change a file: SQLite's ``mode=ro`` would leave ``-wal``/``-shm`` files
behind on a quiescent WAL database, so when no ``-wal`` exists we read with
``immutable=1`` and then confirm that no writer appeared meanwhile (retrying the
normal way if one did).

Every ``sqlite3`` error is translated here, in :func:`sqlite_errors`, and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import quote

from ledger.errors import (
    CorruptLedgerError,
    FencedError,
    LedgerError,
    LedgerNotFoundError,
    LedgerWriteError,
)
from ledger.events import Event, encode_many_checked, schema_of, tag_of
from ledger.store import queries
from ledger.store.format import (
    READ_MODEL_SCHEMA,
    check_format,
    check_wal_pair,
    create,
    creation_leftovers,
    remove_creation_leftovers,
    trailing_garbage,
)
from ledger.store.interface import (
    OPERATOR_EPOCH,
    EventChunk,
    ReadRaced,
    MakeChecked,
    ReadModelMaintainer,
    ReadModelRows,
    Snapshot,
    StepRun,
    StoredEvent,
    StoreHealth,
    read_consistent,
)

BUSY_TIMEOUT_S = 30.0
#: Snapshots kept: older ones are never needed (time travel replays from the closest).
SNAPSHOTS_KEPT = 2


@contextlib.contextmanager
def sqlite_errors(path: Path, doing: str) -> Iterator[None]:
    """Translate every ``sqlite3`` error raised inside into a one-line error.

    Lock timeouts, I/O and damage become :class:`LedgerError` subclasses with what to
    do; misuse of the ``sqlite3`` API is a bug in ckpt-ledger and says so instead of
    blaming the file.
    """
    try:
        yield
    except (sqlite3.ProgrammingError, sqlite3.InterfaceError) as exc:
        raise RuntimeError(f"{path}: ckpt-ledger misused SQLite while {doing} ({exc}); this is a bug, please report it") from exc
    except sqlite3.Error as exc:
        name = getattr(exc, "sqlite_errorname", "")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            raise LedgerError(
                f"{path}: ledger stayed locked by another writer for {BUSY_TIMEOUT_S:.0f}s while {doing}; retry"
            ) from exc
        if name.startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
            raise LedgerWriteError(f"{path}: could not {doing}: {exc} ({name}); check disk space and permissions") from exc
        if name.startswith(("SQLITE_CONSTRAINT", "SQLITE_MISUSE", "SQLITE_RANGE")):
            raise RuntimeError(f"{path}: ckpt-ledger broke a database rule while {doing} ({exc}); "
                               "this is a bug, please report it") from exc
        raise CorruptLedgerError(
            f"{path} is not a readable ckpt-ledger database ({exc}); "
            "restore it from a backup or point at the right run directory"
        ) from exc


def new_event_ids(n: int) -> list[str]:
    """``n`` fresh event ids: 32 hex digits laid out as UUIDv7 (RFC 9562), one ``urandom`` call for all.

    The leading 48 bits are the millisecond clock, so ids minted together sort
    together: inserting a batch touches the right edge of the ``event_id`` index
    instead of random pages all over it (uniqueness rests on the 74 random bits;
    the clock only places them).
    """
    raw = bytearray(os.urandom(16 * n))
    stamp = (time.time_ns() // 1_000_000).to_bytes(6, "big")
    for i in range(0, 16 * n, 16):
        raw[i : i + 6] = stamp
    raw[6::16] = bytes(b & 0x0F | 0x70 for b in raw[6::16])  # version 7
    raw[8::16] = bytes(b & 0x3F | 0x80 for b in raw[8::16])  # RFC 4122 variant
    text = raw.hex()
    return [text[i : i + 32] for i in range(0, 32 * n, 32)]


class SqliteReader:
    """:class:`~ledger.store.interface.StoreReader` over one open SQLite transaction."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path
        self._has_read_model: bool | None = None

    def max_seq(self) -> int:
        return queries.max_seq(self._conn)

    def max_epoch(self) -> int:
        return queries.max_epoch(self._conn)

    def events(self, *, after: int = 0, until: int | None = None, tags: Sequence[str] | None = None,
               limit: int | None = None) -> Iterator[StoredEvent]:
        return queries.events(self._conn, after=after, until=until, tags=tags, limit=limit)

    def chunks(self, *, after: int = 0, until: int | None = None) -> Iterator[EventChunk]:
        return queries.event_chunks(self._conn, after=after, until=until)

    def replay_parts(self, *, after: int = 0, until: int | None = None) -> Iterator[EventChunk | StepRun]:
        return queries.replay_parts(self._conn, after=after, until=until)

    def checkpoint_events(self, checkpoint_id: str) -> list[StoredEvent]:
        return queries.checkpoint_events(self._conn, checkpoint_id)

    def snapshot_seq(self, *, at_most: int, projection_version: int) -> int:
        return queries.snapshot_seq(self._conn, at_most=at_most, projection_version=projection_version)

    def snapshot(self, *, at_most: int, projection_version: int) -> Snapshot | None:
        return queries.snapshot(self._conn, at_most=at_most, projection_version=projection_version)

    def snapshot_count(self, *, projection_version: int) -> int:
        return queries.snapshot_count(self._conn, projection_version=projection_version)

    def _read_model_present(self) -> bool:
        if self._has_read_model is None:
            self._has_read_model = queries.has_read_model(self._conn)
        return self._has_read_model

    def read_model_seq(self, *, version: int) -> int | None:
        if not self._read_model_present():
            return None
        stored_version = queries.read_model_fact(self._conn, "version")
        seq = queries.read_model_fact(self._conn, "seq")
        if stored_version is None or seq is None or int(stored_version) != version:
            return None
        return int(seq)

    def read_model_fact(self, key: str) -> bytes | None:
        return queries.read_model_fact(self._conn, key) if self._read_model_present() else None

    def read_model_checkpoint(self, checkpoint_id: str) -> bytes | None:
        return queries.read_model_checkpoint(self._conn, checkpoint_id) if self._read_model_present() else None

    def read_model_checkpoints(self) -> list[bytes]:
        return queries.read_model_checkpoints(self._conn) if self._read_model_present() else []

    def read_model_attempts(self) -> list[bytes]:
        return queries.read_model_attempts(self._conn) if self._read_model_present() else []

    def health(self, *, thorough: bool = False) -> StoreHealth:
        facts = queries.health_facts(self._conn, thorough=thorough)
        return StoreHealth(
            integrity=facts["integrity"], events=facts["events"], first_seq=facts["first_seq"],
            last_seq=facts["last_seq"], max_epoch=facts["max_epoch"], newest_event_epoch=facts["newest_event_epoch"],
            trailing_bytes=trailing_garbage(self._path),
            details={"page_count": facts["page_count"], "page_size": facts["page_size"]},
            leftovers=[str(p) for p in creation_leftovers(self._path)],
        )


def _write_read_model(conn: sqlite3.Connection, rows: ReadModelRows) -> None:
    if rows.full:
        conn.execute("DELETE FROM rm_facts")
        conn.execute("DELETE FROM rm_checkpoints")
        conn.execute("DELETE FROM rm_attempts")
    facts = {**rows.facts, "seq": str(rows.seq).encode(), "version": str(rows.version).encode()}
    conn.executemany("INSERT OR REPLACE INTO rm_facts (key, value) VALUES (?, ?)", facts.items())
    conn.executemany(
        "INSERT OR REPLACE INTO rm_checkpoints (checkpoint_id, started_seq, step, status, state) VALUES (?, ?, ?, ?, ?)",
        [(cid, r.started_seq, r.step, r.status, r.state) for cid, r in rows.checkpoints.items()],
    )
    if rows.removed_checkpoints:
        conn.executemany("DELETE FROM rm_checkpoints WHERE checkpoint_id = ?", [(c,) for c in rows.removed_checkpoints])
    conn.executemany("INSERT OR REPLACE INTO rm_attempts (epoch, state) VALUES (?, ?)", rows.attempts.items())


class SqliteStore:
    """One process's handle on ``RUN_DIR/ledger.db``: a writer (one connection) or a read-only reader."""

    def __init__(self, path: Path, *, read_only: bool) -> None:
        self.path = path
        self.location = str(path)
        self.read_only = read_only
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._inserted: EventChunk | None = None  # what the open transaction inserted, for its maintainer
        if read_only:
            self._open_reader()
        else:
            self._open_writer()

    # -- opening ------------------------------------------------------------------------------

    def _open_reader(self) -> None:
        path = self.path
        if not path.exists():
            raise LedgerNotFoundError(
                f"no ledger at {path}; check the run directory (a run creates it with `ckpt-ledger train`)"
            )
        if path.is_dir():
            raise CorruptLedgerError(f"{path} is a directory, not a ledger file")
        if path.stat().st_size == 0:
            raise CorruptLedgerError(f"{path} is empty (0 bytes), not a ledger; restore it or use a new run directory")
        check_wal_pair(path)
        read_consistent(self, lambda reader: None)  # checks the format marker (retried if a writer raced it)

    def _open_writer(self) -> None:
        path = self.path
        if not path.exists():
            with sqlite_errors(path, "create the ledger"):
                create(path)
        elif path.stat().st_size == 0:
            raise CorruptLedgerError(f"{path} is empty (0 bytes), not a ledger; restore it or use a new run directory")
        check_wal_pair(path)
        # Appending to a file of unknown provenance would bury the damage: refuse.
        if garbage := trailing_garbage(path):
            raise CorruptLedgerError(
                f"{path} has {garbage} byte(s) of unknown data after its last page; back it up and truncate it "
                f"to {path.stat().st_size - garbage} bytes, or restore it (see `ckpt-ledger audit`)"
            )
        with sqlite_errors(path, "open the ledger"):
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
            try:
                check_format(conn, path)
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                if not queries.has_read_model(conn):  # a ledger created before the read model existed
                    conn.executescript("BEGIN IMMEDIATE;" + READ_MODEL_SCHEMA + "COMMIT;")
            except BaseException:
                conn.close()
                raise
        self._conn = conn
        remove_creation_leftovers(path)

    def close(self) -> None:
        """Close the connection (SQLite checkpoints the WAL if no one else is reading). Idempotent."""
        with self._lock:
            if self._conn is not None:
                with sqlite_errors(self.path, "close the ledger"):
                    self._conn.close()
                self._conn = None

    def connection_settings(self) -> dict[str, Any]:
        """The writer connection's durability settings (journal mode, synchronous level, busy timeout)."""
        with self._lock, sqlite_errors(self.path, "read the connection settings"):
            conn = self._writer_conn()
            return {name: conn.execute(f"PRAGMA {name}").fetchone()[0]
                    for name in ("journal_mode", "synchronous", "busy_timeout")}

    # -- reading ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self, doing: str = "read the ledger") -> Iterator[SqliteReader]:
        """One consistent read transaction (see :class:`~ledger.store.interface.StoreReader`)."""
        if not self.read_only:
            with self._lock, sqlite_errors(self.path, doing):
                conn = self._writer_conn()
                conn.execute("BEGIN")
                try:
                    yield SqliteReader(conn, self.path)
                finally:
                    conn.execute("COMMIT")
            return
        with self._read_only_conn(doing) as conn:
            yield SqliteReader(conn, self.path)

    @contextlib.contextmanager
    def _read_only_conn(self, doing: str) -> Iterator[sqlite3.Connection]:
        path = self.path
        wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
        if wal.exists() and not shm.exists():
            with self._private_copy(doing) as conn:
                yield conn
            return
        immutable = not wal.exists()
        before = path.stat()

        def raced() -> bool:
            after = path.stat()
            return wal.exists() or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns)

        params = "mode=ro&immutable=1" if immutable else "mode=ro"
        try:
            with sqlite_errors(path, doing):
                conn = sqlite3.connect(f"file:{quote(str(path))}?{params}", uri=True, isolation_level=None)
                try:
                    check_format(conn, path)
                    conn.execute("BEGIN")
                    yield conn
                    conn.execute("COMMIT")
                finally:
                    conn.close()
        except CorruptLedgerError as exc:
            if immutable and raced():  # a torn read of pages a writer was changing, not damage
                raise ReadRaced(f"{path}: a writer changed the ledger during a lock-free read") from exc
            raise
        if immutable and raced():
            # A writer appeared while we read the main file without locks: the caller reads again, the locked way.
            raise ReadRaced(f"{path}: a writer changed the ledger during a lock-free read")

    @contextlib.contextmanager
    def _private_copy(self, doing: str) -> Iterator[sqlite3.Connection]:
        # A -wal without its -shm (e.g. a copied run dir): SQLite would create the -shm
        # in the run dir, so recover a private copy instead and leave the originals alone.
        with tempfile.TemporaryDirectory(prefix="ckpt-ledger-read-") as tmp:
            copy = Path(tmp) / self.path.name
            shutil.copyfile(self.path, copy)
            shutil.copyfile(f"{self.path}-wal", f"{copy}-wal")
            with sqlite_errors(self.path, doing):
                conn = sqlite3.connect(copy, isolation_level=None)
                try:
                    check_format(conn, self.path)
                    conn.execute("BEGIN")
                    yield conn
                    conn.execute("COMMIT")
                finally:
                    conn.close()

    # -- writing ------------------------------------------------------------------------------

    def _writer_conn(self) -> sqlite3.Connection:
        if self.read_only:
            raise LedgerError(f"{self.path} was opened read-only; open it with read_only=False to append")
        if self._conn is None:
            raise LedgerError(f"{self.path}: the ledger was closed; open it again")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self, doing: str, maintainer: ReadModelMaintainer | None = None) -> Iterator[sqlite3.Connection]:
        with self._lock, sqlite_errors(self.path, doing):
            conn = self._writer_conn()
            conn.execute("BEGIN IMMEDIATE")
            self._inserted = None
            try:
                yield conn
                if maintainer is not None:
                    rows = maintainer.advance(SqliteReader(conn, self.path), self._inserted)
                    if rows is not None:
                        _write_read_model(conn, rows)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if maintainer is not None:
                    maintainer.discard()
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                if maintainer is not None:
                    maintainer.discard()
                raise

    def _fence(self, conn: sqlite3.Connection, epoch: int) -> None:
        if epoch == OPERATOR_EPOCH:
            return
        current = queries.max_epoch(conn)
        if epoch < current:
            raise FencedError(
                f"{self.path}: attempt epoch {epoch} was fenced by epoch {current} (a newer attempt started); "
                "this job must stop",
                epoch=epoch,
                fenced_by=current,
            )
        if epoch > current:
            raise LedgerError(f"{self.path}: epoch {epoch} was never begun (newest is {current}); call begin_attempt")

    def _insert(self, conn: sqlite3.Connection, items: Sequence[tuple[Event, str]], epoch: int) -> list[int]:
        next_seq = queries.max_seq(conn) + 1
        now = time.time()
        payloads, stored = encode_many_checked([event for event, _ in items])
        rows = []
        for offset, ((event, event_id), payload) in enumerate(zip(items, payloads)):
            tag = tag_of(event)
            rows.append(
                (next_seq + offset, event_id, epoch, now, tag, schema_of(tag),
                 getattr(event, "checkpoint_id", None), payload.decode())
            )
        conn.executemany(
            "INSERT INTO events (seq, event_id, epoch, recorded_at, tag, schema_version, checkpoint_id, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        seqs = [row[0] for row in rows]
        # The maintainer folds the events as a reader will decode them, not the caller's objects.
        self._inserted = EventChunk(seqs, [epoch] * len(rows), [now] * len(rows), stored)
        return seqs

    def append(self, events: Sequence[Event], *, epoch: int, event_ids: Sequence[str | None] | None = None,
               maintainer: ReadModelMaintainer | None = None) -> list[int]:
        """See :meth:`ledger.store.interface.LedgerStore.append`."""
        given = list(event_ids) if event_ids is not None else [None] * len(events)
        if len(given) != len(events):
            raise ValueError("event_ids must match events one to one")
        # Only caller-supplied ids can already be stored: ids minted here are fresh 122-bit random
        # values, and probing the index for each of them was a third of a batched append.
        supplied = [i for i in given if i]
        minted = iter(new_event_ids(len(given) - len(supplied)))
        ids = [i or next(minted) for i in given]
        if len(set(ids)) != len(ids):
            raise ValueError("an event id repeats within one append; give each event its own id")
        with self._transaction(f"append {len(events)} event(s)", maintainer) as conn:
            existing = queries.stored_ids(conn, supplied)
            fresh = [(e, i) for e, i in zip(events, ids) if i not in existing]
            if fresh:
                self._fence(conn, epoch)
                existing.update(zip((i for _, i in fresh), self._insert(conn, fresh, epoch)))
            return [existing[i] for i in ids]

    def append_checked(self, make: MakeChecked, *, checkpoint_id: str, epoch: int, event_id: str,
                       maintainer: ReadModelMaintainer | None = None) -> int:
        """See :meth:`ledger.store.interface.LedgerStore.append_checked`."""
        with self._transaction("append an event", maintainer) as conn:
            stored = queries.stored_ids(conn, [event_id])
            if stored:
                return stored[event_id]
            self._fence(conn, epoch)
            event = make(queries.checkpoint_events(conn, checkpoint_id))
            return self._insert(conn, [(event, event_id)], epoch)[0]

    def begin_epoch(self, make: Callable[[int], Event], *, event_id: str | None = None,
                    maintainer: ReadModelMaintainer | None = None) -> tuple[int, int]:
        """See :meth:`ledger.store.interface.LedgerStore.begin_epoch`."""
        with self._transaction("begin an attempt", maintainer) as conn:
            epoch = queries.max_epoch(conn) + 1
            conn.execute("UPDATE meta SET value = ? WHERE key = 'max_epoch'", (str(epoch),))
            (seq,) = self._insert(conn, [(make(epoch), event_id or uuid.uuid4().hex)], epoch)
            return epoch, seq

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store a materialized projection covering events up to ``snapshot.seq``."""
        with self._transaction("save a projection snapshot") as conn:
            conn.execute("INSERT OR REPLACE INTO snapshots (seq, projection_version, state) VALUES (?, ?, ?)",
                         (snapshot.seq, snapshot.projection_version, snapshot.state))
            conn.execute("DELETE FROM snapshots WHERE seq NOT IN (SELECT seq FROM snapshots ORDER BY seq DESC LIMIT ?)",
                         (SNAPSHOTS_KEPT,))

    def write_read_model(self, rows: ReadModelRows) -> None:
        """Write read-model rows in their own transaction (a rebuild on open)."""
        with self._transaction("rebuild the read model") as conn:
            _write_read_model(conn, rows)
