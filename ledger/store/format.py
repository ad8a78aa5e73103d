"""The on-disk format of ``RUN_DIR/ledger.db``: creation, the format marker, and file-level damage checks.

Layout (format :data:`LEDGER_FORMAT`, marked by ``PRAGMA application_id`` and
``user_version`` so a foreign or newer file is refused):

* ``events``  — one row per event: ``seq`` (contiguous from 1), ``event_id`` (unique),
  ``epoch``, ``recorded_at``, ``tag``, ``schema_version``, ``checkpoint_id`` (copy of
  the payload field, indexed where present, for commit checks), ``payload`` (the
  event as JSON).
* ``meta``    — ``max_epoch`` (the fencing token), ``created_at``, ``format``.
* ``snapshots`` — materialized projections, each with the ``seq`` it covers.
* ``rm_facts``, ``rm_checkpoints``, ``rm_attempts`` — the read model (a cache of the
  fold, see :mod:`ledger.read_model`). Added without a format bump: writers create
  them when missing, and an older writer that does not maintain them only makes
  them stale, which readers detect by seq.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import time
import uuid
from pathlib import Path

from ledger.errors import CorruptLedgerError, SchemaTooNewError

LEDGER_FILE = "ledger.db"
APPLICATION_ID = 0x434B4C47  # "CKLG"
LEDGER_FORMAT = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL, epoch INTEGER NOT NULL, recorded_at FLOAT,
    tag TEXT NOT NULL, schema_version INTEGER NOT NULL, checkpoint_id TEXT, payload TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS idx_events_event_id ON events (event_id);
CREATE INDEX IF NOT EXISTS idx_events_checkpoint_id ON events (checkpoint_id) WHERE checkpoint_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_events_tag ON events (tag);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS snapshots (seq INTEGER PRIMARY KEY, projection_version INTEGER, state BLOB);
"""

READ_MODEL_SCHEMA = """
CREATE TABLE IF NOT EXISTS rm_facts (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rm_checkpoints (
    checkpoint_id TEXT PRIMARY KEY, started_seq INTEGER NOT NULL, step INTEGER NOT NULL,
    status TEXT NOT NULL, state BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS idx_rm_checkpoints_started ON rm_checkpoints (started_seq);
CREATE TABLE IF NOT EXISTS rm_attempts (epoch INTEGER PRIMARY KEY, state BLOB NOT NULL);
"""


def check_format(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a file that is not a ckpt-ledger ledger, or one written by a newer format."""
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


def creation_leftovers(path: Path) -> list[Path]:
    """Half-built ledgers (``.ledger.db.*.creating`` and their ``-wal``/``-shm``) a crash during creation left behind."""
    return sorted(path.parent.glob(f".{path.name}.*.creating*"))


def remove_creation_leftovers(path: Path) -> list[Path]:
    """Delete the :func:`creation_leftovers` no live process is still building; returns what was removed.

    A creator holds an exclusive ``flock`` on its temp file until it is done, so a
    temp file we can lock belongs to a creator that died.
    """
    removed = []
    for main in path.parent.glob(f".{path.name}.*.creating"):
        try:
            fd = os.open(main, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # still being created
            for part in (main, Path(f"{main}-wal"), Path(f"{main}-shm"), Path(f"{main}-journal")):
                if part.exists():
                    part.unlink(missing_ok=True)
                    removed.append(part)
        finally:
            os.close(fd)
    for orphan in creation_leftovers(path):  # a -wal/-shm whose main temp file is already gone
        main = Path(str(orphan).rsplit("-", 1)[0]) if not orphan.name.endswith(".creating") else orphan
        if main != orphan and not main.exists():
            orphan.unlink(missing_ok=True)
            removed.append(orphan)
    return removed


def create(path: Path) -> None:
    """Create a ledger atomically: build it under a temp name, then link it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.creating")
    lock_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # tells remove_creation_leftovers this one is alive
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {LEDGER_FORMAT}")
            conn.executescript(_SCHEMA + READ_MODEL_SCHEMA)
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("max_epoch", "0"), ("format", str(LEDGER_FORMAT)), ("created_at", repr(time.time()))],
            )
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
        os.close(lock_fd)
