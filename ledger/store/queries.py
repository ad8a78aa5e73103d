"""Every SQL read of the SQLite backend, as small functions of an open connection.

Only :mod:`ledger.store.log` calls these, inside the transaction it owns.
"""

from __future__ import annotations

import sqlite3
import warnings
from typing import Any, Iterator, Sequence

import numpy as np

from ledger.events import STEP_PAYLOAD_FRAME, decode, decode_many
from ledger.store.interface import EventChunk, Snapshot, StepRun, StoredEvent

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


#: Seqs read per :func:`replay_parts` window (bounded memory: a few MB of text per window).
REPLAY_WINDOW = 65536
#: Steps at or above this are read by the decoder: below it every step sum in a window fits an int64.
_FAST_STEP_LIMIT = 10**12
_STEP_DIGITS = len(str(_FAST_STEP_LIMIT)) + 1  # enough text to see the number and what follows it
_POWERS_OF_TEN = np.array([10**k for k in range(_STEP_DIGITS)], dtype=np.int64)

# Per step row of a window, one integer ``step * 16 + where``: SQLite parses the step's digits
# out of the stored payload (CAST reads the leading integer) and finds the character that
# should follow them (``where``, 1-based, < 16); numpy then checks that each row was framed
# exactly as the encoder frames it (no sign, no leading zero, no fraction or exponent). A row
# of an old schema or another prefix gives -1. The rows' epochs come as a range (a window is
# nearly always one attempt's); their seqs are the window's seqs the other rows do not take.
# group_concat receives the subquery's rows in its ORDER BY order: the rows' order is seq
# order (tests/properties/test_prop_step_runs.py would fail if SQLite changed that).
_STEP_COLUMNS = """
SELECT group_concat(packed, ','), count(*), min(epoch), max(epoch) FROM (
  SELECT CASE WHEN schema_version = :schema AND substr(payload, 1, :plen) = :prefix
         THEN CAST(substr(payload, :plen + 1, :digits) AS INTEGER) * 16
              + instr(substr(payload, :plen + 1, :digits), :follower)
         ELSE -1 END AS packed, epoch
  FROM events WHERE seq > :lo AND seq <= :hi AND +tag = :tag ORDER BY seq)
"""
_STEP_EPOCHS = """
SELECT group_concat(epoch, ',') FROM (SELECT epoch FROM events WHERE seq > ? AND seq <= ? AND +tag = ? ORDER BY seq)
"""


def replay_parts(conn: sqlite3.Connection, *, after: int, until: int | None) -> Iterator[EventChunk | StepRun]:
    """Events ``after < seq <= until`` for a fold: step events as :class:`StepRun` columns, the rest decoded.

    Each window of seqs takes two scans: the rows that are not ``step.completed``
    (decoded, like :func:`event_chunks`), and the step rows' steps as one text parsed
    by numpy. A million-event log is mostly step rows, and building a Python row and an
    event object for each was most of a replay's time. Anything unexpected in a window
    (an old schema, a payload framed otherwise, a gap in the seqs) sends the whole
    window through the decoder, which names what is wrong.
    """
    top = max_seq(conn) if until is None else min(until, max_seq(conn))
    frame = STEP_PAYLOAD_FRAME
    params = {"schema": frame.schema_version, "plen": len(frame.prefix), "prefix": frame.prefix,
              "digits": _STEP_DIGITS, "follower": frame.follower, "tag": frame.tag}
    lo = after
    while lo < top:
        hi = min(lo + REPLAY_WINDOW, top)
        yield from _replay_window(conn, lo, hi, params)
        lo = hi


def _replay_window(conn: sqlite3.Connection, lo: int, hi: int,
                   params: dict[str, Any]) -> Iterator[EventChunk | StepRun]:
    others = conn.execute(_SELECT_ENVELOPES + " WHERE seq > ? AND seq <= ? AND tag != ? ORDER BY seq",
                          (lo, hi, params["tag"])).fetchall()
    text, count, low_epoch, high_epoch = conn.execute(_STEP_COLUMNS, {**params, "lo": lo, "hi": hi}).fetchone()
    packed = _integers(text, count)
    steps = packed >> 4 if packed is not None else None
    if packed is None or count + len(others) != hi - lo or not _framed(steps, packed & 15).all():
        yield from event_chunks(conn, after=lo, until=hi)
        return
    other_seqs = np.fromiter((row[0] for row in others), dtype=np.int64, count=len(others))
    taken_by_steps = np.ones(hi - lo, dtype=bool)
    taken_by_steps[other_seqs - (lo + 1)] = False
    seqs = np.arange(lo + 1, hi + 1, dtype=np.int64)[taken_by_steps]
    if low_epoch == high_epoch:
        epochs = np.full(count, low_epoch if low_epoch is not None else 0, dtype=np.int64)
    else:
        epochs = _integers(conn.execute(_STEP_EPOCHS, (lo, hi, params["tag"])).fetchone()[0], count)
        if epochs is None:
            yield from event_chunks(conn, after=lo, until=hi)
            return
    if not others:
        yield StepRun(seqs, epochs, steps)
        return
    _, other_epochs, recorded, tags, schemas, payloads = zip(*others)
    seq_tuple = tuple(other_seqs.tolist())
    events = decode_many(seq_tuple, tags, schemas, payloads)
    # Step rows before each other row; other rows with the same count have no step between them.
    before = np.searchsorted(seqs, other_seqs)
    starts = [0, *(np.flatnonzero(np.diff(before)) + 1).tolist(), len(others)]
    taken = 0
    for start, end in zip(starts, starts[1:]):
        upto = int(before[start])
        if upto > taken:
            yield StepRun(seqs[taken:upto], epochs[taken:upto], steps[taken:upto])
            taken = upto
        yield EventChunk(seq_tuple[start:end], other_epochs[start:end], recorded[start:end], events[start:end])
    if taken < seqs.size:
        yield StepRun(seqs[taken:], epochs[taken:], steps[taken:])


def _integers(text: str | None, count: int) -> Any:
    """``count`` comma-separated integers as an int64 array, or ``None`` if the text is not that."""
    if not count:
        return np.empty(0, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy's word for "stopped at a non-number"
        values = np.fromstring(text or "", dtype=np.int64, sep=",")
    return values if values.size == count and text.count(",") == count - 1 else None


def _framed(steps: Any, follower_at: Any) -> Any:
    """Per row: the step was written as the encoder writes it (plain digits, then the follower)."""
    digits = np.maximum(np.searchsorted(_POWERS_OF_TEN, steps, side="right"), 1)
    return (steps >= 0) & (steps < _FAST_STEP_LIMIT) & (follower_at == digits + 1)


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
