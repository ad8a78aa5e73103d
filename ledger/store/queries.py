"""Every SQL read of the SQLite backend, as small functions of an open connection.

Only :mod:`ledger.store.log` calls these, inside the transaction it owns.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Iterator, Sequence

from ledger.events import decode, decode_many
from ledger.store.interface import EventChunk, Snapshot, StoredEvent

#: Rows decoded per batch by :func:`event_chunks` (bounded memory, few Python calls per row).
CHUNK_ROWS = 8192

_SELECT_EVENTS = "SELECT seq, event_id, epoch, recorded_at, tag, schema_version, payload FROM events"
_SELECT_ENVELOPES = "SELECT seq, epoch, recorded_at, tag, schema_version, payload FROM events"


def _row_to_event(row: Sequence[Any]) -> StoredEvent:
    seq, event_id, epoch, recorded_at, tag, schema_version, payload = row
    return StoredEvent(seq=seq, event_id=event_id, epoch=epoch, recorded_at=recorded_at, tag=tag,
                       schema_version=schema_version,
                       event=decode(payload, tag=tag, schema_version=schema_version, seq=seq))


def _range(after: int, until: int | None) -> tuple[str, list[Any]]:
    sql, args = " WHERE seq > ?", [after]
    if until is not None:
        sql += " AND seq <= ?"
        args.append(until)
    return sql, args


def events(conn: sqlite3.Connection, *, after: int, until: int | None, tags: Sequence[str] | None,
           limit: int | None) -> Iterator[StoredEvent]:
    """Events with ``after < seq <= until`` (optionally some tags), in seq order, at most ``limit``."""
    where, args = _range(after, until)
    if tags is not None:
        tags = list(tags)
        where += f" AND tag IN ({','.join('?' * len(tags))})"
        args.extend(tags)
    sql = _SELECT_EVENTS + where + " ORDER BY seq"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    for row in conn.execute(sql, args):
        yield _row_to_event(row)


def event_chunks(conn: sqlite3.Connection, *, after: int, until: int | None,
                 chunk_rows: int = CHUNK_ROWS) -> Iterator[EventChunk]:
    """Events with ``after < seq <= until`` as column chunks (one decoder call per chunk)."""
    where, args = _range(after, until)
    cursor = conn.execute(_SELECT_ENVELOPES + where + " ORDER BY seq", args)
    while rows := cursor.fetchmany(chunk_rows):
        seqs, epochs, recorded, tags, schemas, payloads = zip(*rows)
        yield EventChunk(seqs, epochs, recorded, decode_many(seqs, tags, schemas, payloads))


def checkpoint_events(conn: sqlite3.Connection, checkpoint_id: str) -> list[StoredEvent]:
    """Every event about one checkpoint, in order (uses the checkpoint_id index)."""
    rows = conn.execute(_SELECT_EVENTS + " WHERE checkpoint_id = ? ORDER BY seq", (checkpoint_id,))
    return [_row_to_event(r) for r in rows]


def stored_ids(conn: sqlite3.Connection, event_ids: Sequence[str]) -> dict[str, int]:
    """``event_id -> seq`` for those of ``event_ids`` already stored."""
    if not event_ids:
        return {}
    sql = f"SELECT event_id, seq FROM events WHERE event_id IN ({','.join('?' * len(event_ids))})"
    return dict(conn.execute(sql, list(event_ids)).fetchall())


def max_seq(conn: sqlite3.Connection) -> int:
    """The newest sequence number (0 for an empty log)."""
    return conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]


def max_epoch(conn: sqlite3.Connection) -> int:
    """The stored fencing token."""
    return int(conn.execute("SELECT value FROM meta WHERE key = 'max_epoch'").fetchone()[0])


def snapshot_seq(conn: sqlite3.Connection, *, at_most: int, projection_version: int) -> int:
    """The seq of the newest snapshot covering at most ``at_most`` events (0 if none)."""
    row = conn.execute("SELECT MAX(seq) FROM snapshots WHERE seq <= ? AND projection_version = ?",
                       (at_most, projection_version)).fetchone()
    return row[0] or 0


def snapshot(conn: sqlite3.Connection, *, at_most: int, projection_version: int) -> Snapshot | None:
    """The newest snapshot covering at most ``at_most`` events."""
    row = conn.execute("SELECT seq, state FROM snapshots WHERE seq <= ? AND projection_version = ? "
                       "ORDER BY seq DESC LIMIT 1", (at_most, projection_version)).fetchone()
    return Snapshot(seq=row[0], projection_version=projection_version, state=row[1]) if row else None


def snapshot_count(conn: sqlite3.Connection, *, projection_version: int) -> int:
    """How many snapshots of one projection version are stored."""
    return conn.execute("SELECT COUNT(*) FROM snapshots WHERE projection_version = ?",
                        (projection_version,)).fetchone()[0]


def has_read_model(conn: sqlite3.Connection) -> bool:
    """Whether the read-model tables exist (a ledger created before them has none until a writer opens it)."""
    return conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'rm_facts'").fetchone()[0] > 0


def read_model_fact(conn: sqlite3.Connection, key: str) -> bytes | None:
    """One read-model fact, or ``None``."""
    row = conn.execute("SELECT value FROM rm_facts WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def read_model_checkpoint(conn: sqlite3.Connection, checkpoint_id: str) -> bytes | None:
    """One checkpoint's read-model row."""
    row = conn.execute("SELECT state FROM rm_checkpoints WHERE checkpoint_id = ?", (checkpoint_id,)).fetchone()
    return row[0] if row else None


def read_model_checkpoints(conn: sqlite3.Connection) -> list[bytes]:
    """Every checkpoint's read-model row, in start order."""
    return [r[0] for r in conn.execute("SELECT state FROM rm_checkpoints ORDER BY started_seq")]


def read_model_attempts(conn: sqlite3.Connection) -> list[bytes]:
    """Every attempt's read-model row, oldest first."""
    return [r[0] for r in conn.execute("SELECT state FROM rm_attempts ORDER BY epoch")]


def health_facts(conn: sqlite3.Connection, *, thorough: bool) -> dict[str, Any]:
    """What :class:`~ledger.store.interface.StoreHealth` reports, read in one transaction."""
    pragma = "integrity_check" if thorough else "quick_check"
    count, first, last = conn.execute(
        "SELECT COUNT(*), COALESCE(MIN(seq), 1), COALESCE(MAX(seq), 0) FROM events").fetchone()
    return {
        "integrity": [row[0] for row in conn.execute(f"PRAGMA {pragma}(20)")],
        "page_count": conn.execute("PRAGMA page_count").fetchone()[0],
        "page_size": conn.execute("PRAGMA page_size").fetchone()[0],
        "events": count,
        "first_seq": first,
        "last_seq": last,
        "max_epoch": max_epoch(conn),
        "newest_event_epoch": conn.execute("SELECT COALESCE(MAX(epoch), 0) FROM events").fetchone()[0],
    }
