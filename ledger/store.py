"""The append-only event log in SQLite: fenced, idempotent, durable appends and side-effect-free reads.

Layout of ``RUN_DIR/ledger.db`` (format :data:`LEDGER_FORMAT`, marked by
``PRAGMA application_id`` and ``user_version`` so a foreign or newer file is refused):

* ``events``  — one row per event: ``seq`` (contiguous from 1), ``event_id`` (unique),
  ``epoch``, ``recorded_at``, ``tag``, ``schema_version``, ``checkpoint_id`` (indexed
  copy of the payload field, for commit checks), ``payload`` (the event as JSON).
* ``meta``    — ``max_epoch`` (the fencing token), ``created_at``, ``format``.
* ``snapshots`` — materialized projections, each with the ``seq`` it covers.

Writers use WAL, ``synchronous=FULL`` and ``BEGIN IMMEDIATE``; the fence check and
the insert happen in the same transaction. Readers never create or change a file:
SQLite's ``mode=ro`` would leave ``-wal``/``-shm`` files behind on a quiescent WAL
database, so when no ``-wal`` exists we read with ``immutable=1`` and then confirm
that no writer appeared meanwhile (retrying the normal way if one did).

Every ``sqlite3`` error is translated to a :class:`~ledger.errors.LedgerError` here,
in :func:`sqlite_errors`, and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import struct
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar
from urllib.parse import quote

import msgspec
import sqlite_utils

from ledger.errors import (
    CorruptLedgerError,
    FencedError,
    LedgerError,
    LedgerNotFoundError,
    LedgerWriteError,
    SchemaTooNewError,
)
from ledger.events import EVENT_TYPES, AnyEvent, Event, decode, encode, schema_of, tag_of

LEDGER_FILE = "ledger.db"
APPLICATION_ID = 0x434B4C47  # "CKLG"
LEDGER_FORMAT = 1
BUSY_TIMEOUT_S = 30.0
OPERATOR_EPOCH = 0  # appends made outside any attempt (CLI pin, gc): never fenced

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One log entry: the envelope kept by the store plus the decoded event."""

    seq: int
    event_id: str
    epoch: int
    recorded_at: float
    tag: str
    schema_version: int
    event: Event


@contextlib.contextmanager
def sqlite_errors(path: Path, doing: str) -> Iterator[None]:
    """Translate every ``sqlite3`` error raised inside into a one-line :class:`LedgerError`."""
    try:
        yield
    except sqlite3.Error as exc:
        name = getattr(exc, "sqlite_errorname", "")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            raise LedgerError(
                f"{path}: ledger stayed locked by another writer for {BUSY_TIMEOUT_S:.0f}s while {doing}; retry"
            ) from exc
        if name.startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
            raise LedgerWriteError(f"{path}: could not {doing}: {exc} ({name}); check disk space and permissions") from exc
        raise CorruptLedgerError(
            f"{path} is not a readable ckpt-ledger database ({exc}); "
            "restore it from a backup or point at the right run directory"
        ) from exc


def _check_format(conn: sqlite3.Connection, path: Path) -> None:
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id != APPLICATION_ID:
        raise CorruptLedgerError(
            f"{path} is an SQLite file but not a ckpt-ledger ledger (application_id={app_id}); "
            "point at a run directory created by ckpt-ledger"
        )
    if version > LEDGER_FORMAT:
        raise SchemaTooNewError(
            f"{path} has ledger format {version}, this ckpt-ledger reads up to {LEDGER_FORMAT}; upgrade ckpt-ledger"
        )
    if version < 1:
        raise CorruptLedgerError(f"{path} has no ledger format version; it was not fully created")


def check_wal_pair(path: Path) -> None:
    """Refuse a ledger whose ``-wal`` was lost while its ``-shm`` says it held committed events.

    SQLite would silently open the main file without them (acknowledged events
    gone); the WAL-index header in ``-shm`` records how many WAL frames were valid.
    """
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    if wal.exists() or not shm.exists():
        return
    with open(shm, "rb") as fh:
        header = fh.read(48)
    if len(header) < 20:
        return
    (frames,) = struct.unpack_from("=I", header, 16)  # WalIndexHdr.mxFrame, native byte order
    if frames > 0:
        raise CorruptLedgerError(
            f"{wal} is missing but {shm.name} records {frames} WAL frame(s) of committed events; "
            "restore the -wal file next to ledger.db (do not open the ledger until then)"
        )


def trailing_garbage(path: Path) -> int:
    """Bytes in the main file past the last page its header declares (0 when healthy or unknowable).

    SQLite ignores such bytes, so a file with garbage appended would otherwise look
    fine. Read from the file header before connecting; skipped while a non-empty WAL
    may hold newer pages (then the header can legitimately lag).
    """
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return 0
    with open(path, "rb") as fh:
        header = fh.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return 0
    (page_size,) = struct.unpack_from(">H", header, 16)
    page_size = 65536 if page_size == 1 else page_size
    change_counter, pages = struct.unpack_from(">II", header, 24)
    (valid_for,) = struct.unpack_from(">I", header, 92)
    if valid_for != change_counter or pages == 0:
        return 0  # the in-header size is not trustworthy (very old writer)
    return max(0, path.stat().st_size - pages * page_size)


def _row_to_event(row: Sequence[Any]) -> StoredEvent:
    seq, event_id, epoch, recorded_at, tag, schema_version, payload = row
    return StoredEvent(
        seq=seq,
        event_id=event_id,
        epoch=epoch,
        recorded_at=recorded_at,
        tag=tag,
        schema_version=schema_version,
        event=decode(payload, tag=tag, schema_version=schema_version, seq=seq),
    )


_SELECT_EVENTS = "SELECT seq, event_id, epoch, recorded_at, tag, schema_version, payload FROM events"


def _select_events(
    conn: sqlite3.Connection, after_seq: int, until_seq: int | None, tags: Iterable[str] | None
) -> Iterator[StoredEvent]:
    sql, args = _SELECT_EVENTS + " WHERE seq > ?", [after_seq]
    if until_seq is not None:
        sql += " AND seq <= ?"
        args.append(until_seq)
    tag_list = list(tags) if tags is not None else None
    if tag_list is not None:
        sql += f" AND tag IN ({','.join('?' * len(tag_list))})"
        args.extend(tag_list)
    for row in conn.execute(sql + " ORDER BY seq", args):
        yield _row_to_event(row)


#: Rows decoded per batch by :func:`iter_event_chunks` (bounded memory, few Python calls per row).
CHUNK_ROWS = 8192

_SELECT_ENVELOPES = "SELECT seq, epoch, recorded_at, tag, schema_version, payload FROM events"
_CURRENT_SCHEMA = {tag: cls.SCHEMA for tag, cls in EVENT_TYPES.items()}
_lines_decoder = msgspec.json.Decoder(AnyEvent)


def _decode_chunk(seqs: Sequence[int], tags: Sequence[str], schemas: Sequence[int], payloads: Sequence[Any]) -> list[Event]:
    """Decode one chunk of payloads, exactly as per-row :func:`decode` would.

    Fast path: every row is at its type's current schema, so the chunk is decoded by one
    ``decode_lines`` call over the newline-joined payloads. The result is used only if
    it maps one to one onto the rows (no payload holds a newline, one event per line,
    each of its row's type); anything else — old schemas, unknown tags, corrupt rows —
    goes row by row through :func:`decode`, which upcasts or raises naming the seq.
    """
    if list(schemas) == list(map(_CURRENT_SCHEMA.get, tags)):
        try:
            text = "\n".join(payloads)
            if text.count("\n") == len(payloads) - 1:
                events = _lines_decoder.decode_lines(text)
                if list(map(type, events)) == list(map(EVENT_TYPES.get, tags)):
                    return events
        except (TypeError, msgspec.DecodeError, msgspec.ValidationError):
            pass  # the row-by-row path below finds the bad row and names it
    return [decode(p, tag=t, schema_version=v, seq=s) for s, t, v, p in zip(seqs, tags, schemas, payloads)]


def iter_event_chunks(
    conn: sqlite3.Connection, *, after_seq: int = 0, until_seq: int | None = None, chunk_rows: int = CHUNK_ROWS
) -> Iterator[tuple[Sequence[int], Sequence[int], Sequence[float], list[Event]]]:
    """The events with ``after_seq < seq <= until_seq`` as ``(seqs, epochs, recorded_ats, events)`` column chunks.

    The replay fast path: no :class:`StoredEvent` per row and one decoder call per
    chunk (only valid while ``conn``'s transaction is open).
    """
    sql, args = _SELECT_ENVELOPES + " WHERE seq > ?", [after_seq]
    if until_seq is not None:
        sql += " AND seq <= ?"
        args.append(until_seq)
    cursor = conn.execute(sql + " ORDER BY seq", args)
    while rows := cursor.fetchmany(chunk_rows):
        seqs, epochs, recorded, tags, schemas, payloads = zip(*rows)
        yield seqs, epochs, recorded, _decode_chunk(seqs, tags, schemas, payloads)


def new_event_ids(n: int) -> list[str]:
    """``n`` random event ids, each formatted like ``uuid.uuid4().hex`` (one ``urandom`` call for all)."""
    raw = bytearray(os.urandom(16 * n))
    raw[6::16] = bytes(b & 0x0F | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes(b & 0x3F | 0x80 for b in raw[8::16])  # RFC 4122 variant
    text = raw.hex()
    return [text[i : i + 32] for i in range(0, 32 * n, 32)]


def _create(path: Path) -> None:
    """Create a ledger atomically: build it under a temp name, then link it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.creating")
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {LEDGER_FORMAT}")
            db = sqlite_utils.Database(conn)
            db["events"].create(
                {
                    "seq": int,
                    "event_id": str,
                    "epoch": int,
                    "recorded_at": float,
                    "tag": str,
                    "schema_version": int,
                    "checkpoint_id": str,
                    "payload": str,
                },
                pk="seq",
                not_null={"event_id", "epoch", "tag", "schema_version", "payload"},
            )
            db["events"].create_index(["event_id"], unique=True)
            db["events"].create_index(["checkpoint_id"])
            db["events"].create_index(["tag"])
            db["meta"].create({"key": str, "value": str}, pk="key")
            db["meta"].insert_all(
                [
                    {"key": "max_epoch", "value": "0"},
                    {"key": "format", "value": str(LEDGER_FORMAT)},
                    {"key": "created_at", "value": repr(time.time())},
                ]
            )
            db["snapshots"].create({"seq": int, "projection_version": int, "state": bytes}, pk="seq")
            conn.execute("PRAGMA journal_mode = WAL")
        finally:
            conn.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if another process created it first: then we open theirs
        except FileExistsError:
            pass
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)


class LogWriter:
    """The single read-write connection of one process to a ledger."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        if not path.exists():
            with sqlite_errors(path, "create the ledger"):
                _create(path)
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
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
            try:
                _check_format(self._conn, path)
                self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                self._conn.execute("PRAGMA journal_mode = WAL")
                self._conn.execute("PRAGMA synchronous = FULL")
            except BaseException:
                self._conn.close()
                raise

    def close(self) -> None:
        """Close the connection (SQLite checkpoints the WAL if no one else is reading)."""
        with self._lock, sqlite_errors(self.path, "close the ledger"):
            self._conn.close()

    @contextlib.contextmanager
    def _transaction(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock, sqlite_errors(self.path, doing):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _max_epoch(self, conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT value FROM meta WHERE key = 'max_epoch'").fetchone()[0])

    def _fence(self, conn: sqlite3.Connection, epoch: int) -> None:
        if epoch == OPERATOR_EPOCH:
            return
        current = self._max_epoch(conn)
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
        next_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0] + 1
        now = time.time()
        rows = []
        for offset, (event, event_id) in enumerate(items):
            tag = tag_of(event)
            rows.append(
                (next_seq + offset, event_id, epoch, now, tag, schema_of(tag),
                 getattr(event, "checkpoint_id", None), encode(event).decode())
            )
        conn.executemany(
            "INSERT INTO events (seq, event_id, epoch, recorded_at, tag, schema_version, checkpoint_id, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        return [row[0] for row in rows]

    def append(self, events: Sequence[Event], *, epoch: int, event_ids: Sequence[str | None] | None = None) -> list[int]:
        """Append events atomically; returns their sequence numbers.

        An event whose id is already stored is not appended again: its original
        sequence number is returned (safe retries).
        """
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
        with self._transaction(f"append {len(events)} event(s)") as conn:
            existing = dict(
                conn.execute(
                    f"SELECT event_id, seq FROM events WHERE event_id IN ({','.join('?' * len(supplied))})", supplied
                ).fetchall()
            ) if supplied else {}
            fresh = [(e, i) for e, i in zip(events, ids) if i not in existing]
            if fresh:
                self._fence(conn, epoch)
                existing.update(zip((i for _, i in fresh), self._insert(conn, fresh, epoch)))
            return [existing[i] for i in ids]

    def append_computed(self, make: Callable[[sqlite3.Connection], Event], *, epoch: int, event_id: str) -> int:
        """Append the event ``make(conn)`` builds inside the transaction, after the fence check.

        ``make`` may read the log and raise to refuse the append (check-then-act
        without a race). An already-stored ``event_id`` returns its seq unchanged.
        """
        with self._transaction("append an event") as conn:
            row = conn.execute("SELECT seq FROM events WHERE event_id = ?", (event_id,)).fetchone()
            if row is not None:
                return row[0]
            self._fence(conn, epoch)
            return self._insert(conn, [(make(conn), event_id)], epoch)[0]

    def begin_epoch(self, make_event: Callable[[int], Event], event_id: str | None = None) -> tuple[int, int]:
        """Append the event ``make_event(new_epoch)`` with epoch = previous max + 1; returns (epoch, seq)."""
        with self._transaction("begin an attempt") as conn:
            epoch = self._max_epoch(conn) + 1
            conn.execute("UPDATE meta SET value = ? WHERE key = 'max_epoch'", (str(epoch),))
            (seq,) = self._insert(conn, [(make_event(epoch), event_id or uuid.uuid4().hex)], epoch)
            return epoch, seq

    def query(self, fn: Callable[[sqlite3.Connection], T], doing: str = "read the ledger") -> T:
        """Run ``fn`` on the writer's connection inside one read transaction."""
        with self._lock, sqlite_errors(self.path, doing):
            self._conn.execute("BEGIN")
            try:
                return fn(self._conn)
            finally:
                self._conn.execute("COMMIT")

    def save_snapshot(self, seq: int, projection_version: int, state: bytes) -> None:
        """Store a materialized projection covering events up to ``seq``."""
        with self._transaction("save a projection snapshot") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO snapshots (seq, projection_version, state) VALUES (?, ?, ?)",
                (seq, projection_version, state),
            )
            # Keep the two newest: older ones are never needed (time travel replays from the closest).
            conn.execute("DELETE FROM snapshots WHERE seq NOT IN (SELECT seq FROM snapshots ORDER BY seq DESC LIMIT 2)")


class LogReader:
    """Side-effect-free reads of a ledger, safe while a writer is active."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            raise LedgerNotFoundError(
                f"no ledger at {path}; check the run directory (a run creates it with `ckpt-ledger train`)"
            )
        if path.is_dir():
            raise CorruptLedgerError(f"{path} is a directory, not a ledger file")
        if path.stat().st_size == 0:
            raise CorruptLedgerError(f"{path} is empty (0 bytes), not a ledger; restore it or use a new run directory")
        check_wal_pair(path)
        self.query(lambda conn: None, "open the ledger")

    def query(self, fn: Callable[[sqlite3.Connection], T], doing: str = "read the ledger") -> T:
        """Run ``fn`` on a fresh read-only connection, inside one read transaction."""
        for _ in range(5):
            wal = Path(f"{self.path}-wal")
            shm = Path(f"{self.path}-shm")
            if wal.exists() and not shm.exists():
                return self._query_copy(fn, doing)
            immutable = not wal.exists()
            before = self.path.stat()
            params = "mode=ro&immutable=1" if immutable else "mode=ro"
            with sqlite_errors(self.path, doing):
                conn = sqlite3.connect(f"file:{quote(str(self.path))}?{params}", uri=True, isolation_level=None)
                try:
                    _check_format(conn, self.path)
                    conn.execute("BEGIN")
                    result = fn(conn)
                    conn.execute("COMMIT")
                finally:
                    conn.close()
            if not immutable:
                return result
            after = self.path.stat()
            if not wal.exists() and (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
                return result
            # A writer appeared while we read the main file without locks: read again, the locked way.
        raise LedgerError(f"{self.path}: ledger kept changing under a lock-free read; retry")

    def _query_copy(self, fn: Callable[[sqlite3.Connection], T], doing: str) -> T:
        # A -wal without its -shm (e.g. a copied run dir): SQLite would create the -shm
        # in the run dir, so recover a private copy instead and leave the originals alone.
        with tempfile.TemporaryDirectory(prefix="ckpt-ledger-read-") as tmp:
            copy = Path(tmp) / LEDGER_FILE
            shutil.copyfile(self.path, copy)
            shutil.copyfile(f"{self.path}-wal", f"{copy}-wal")
            with sqlite_errors(self.path, doing):
                conn = sqlite3.connect(copy, isolation_level=None)
                try:
                    _check_format(conn, self.path)
                    return fn(conn)
                finally:
                    conn.close()


def read_events(
    conn: sqlite3.Connection, *, after_seq: int = 0, until_seq: int | None = None, tags: Iterable[str] | None = None
) -> list[StoredEvent]:
    """The stored events with ``after_seq < seq <= until_seq`` (optionally only some tags), in order."""
    return list(_select_events(conn, after_seq, until_seq, tags))


def iter_events(
    conn: sqlite3.Connection, *, after_seq: int = 0, until_seq: int | None = None, tags: Iterable[str] | None = None
) -> Iterator[StoredEvent]:
    """Like :func:`read_events`, lazily (only valid while ``conn``'s transaction is open)."""
    return _select_events(conn, after_seq, until_seq, tags)


def max_seq(conn: sqlite3.Connection) -> int:
    """The newest sequence number (0 for an empty log)."""
    return conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]


def latest_snapshot_seq(conn: sqlite3.Connection, *, at_most: int, projection_version: int) -> int:
    """The ``seq`` of the newest stored snapshot covering at most ``at_most`` events (0 if none), without reading it."""
    row = conn.execute(
        "SELECT MAX(seq) FROM snapshots WHERE seq <= ? AND projection_version = ?", (at_most, projection_version)
    ).fetchone()
    return row[0] or 0


def latest_snapshot(conn: sqlite3.Connection, *, at_most: int, projection_version: int) -> tuple[int, bytes] | None:
    """The newest stored snapshot covering at most ``at_most`` events, if any."""
    row = conn.execute(
        "SELECT seq, state FROM snapshots WHERE seq <= ? AND projection_version = ? ORDER BY seq DESC LIMIT 1",
        (at_most, projection_version),
    ).fetchone()
    return (row[0], row[1]) if row else None


def checkpoint_events(conn: sqlite3.Connection, checkpoint_id: str) -> list[StoredEvent]:
    """Every event about one checkpoint, in order (uses the checkpoint_id index)."""
    rows = conn.execute(_SELECT_EVENTS + " WHERE checkpoint_id = ? ORDER BY seq", (checkpoint_id,))
    return [_row_to_event(r) for r in rows]
