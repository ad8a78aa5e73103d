"""Reads of one run in a PostgreSQL ledger database: the backend's :class:`~ledger.store.interface.StoreReader`.

A reader works inside a transaction its store opened (``REPEATABLE READ READ ONLY`` for
reads, the append's own ``READ COMMITTED`` one for the read model's fold), and every
query is scoped to its run. Long scans stream through a server-side cursor.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterator, Sequence

import psycopg

from ledger.events import decode, decode_many
from ledger.store.interface import EventChunk, Snapshot, StepRun, StoredEvent, StoreHealth
from ledger.store.postgres_schema import SCHEMA

#: Rows fetched and decoded per batch when streaming events (bounded memory).
CHUNK_ROWS = 8192

EVENTS = f"{SCHEMA}.events"
_SELECT_EVENTS = f"SELECT seq, event_id, epoch, recorded_at, tag, schema_version, payload::text FROM {EVENTS}"
_SELECT_ENVELOPES = f"SELECT seq, epoch, recorded_at, tag, schema_version, payload::text FROM {EVENTS}"


def _row_to_event(row: Sequence[Any]) -> StoredEvent:
    seq, event_id, epoch, recorded_at, tag, schema_version, payload = row
    return StoredEvent(seq=seq, event_id=event_id, epoch=epoch, recorded_at=recorded_at, tag=tag,
                       schema_version=schema_version,
                       event=decode(payload, tag=tag, schema_version=schema_version, seq=seq))


class PostgresReader:
    """:class:`~ledger.store.interface.StoreReader` over one open transaction on a run's rows."""

    def __init__(self, conn: psycopg.Connection, run: str, location: str) -> None:
        self._conn = conn
        self._run = run
        self._location = location

    def _one(self, sql: str, params: Sequence[Any]) -> Any:
        row = self._conn.execute(sql, params).fetchone()
        return row[0] if row else None

    def max_seq(self) -> int:
        return self._one(f"SELECT last_seq FROM {SCHEMA}.runs WHERE run = %s", (self._run,)) or 0

    def max_epoch(self) -> int:
        return self._one(f"SELECT max_epoch FROM {SCHEMA}.runs WHERE run = %s", (self._run,)) or 0

    def _range(self, after: int, until: int | None) -> tuple[str, list[Any]]:
        sql, args = " WHERE run = %s AND seq > %s", [self._run, after]
        if until is not None:
            sql += " AND seq <= %s"
            args.append(until)
        return sql, args

    def _stream(self, sql: str, args: Sequence[Any]) -> Iterator[list[tuple]]:
        # A server-side cursor: a million-event replay never sits in client memory at once.
        with self._conn.cursor(name=f"ckpt_ledger_{uuid.uuid4().hex}") as cur:
            cur.execute(sql, args)
            while rows := cur.fetchmany(CHUNK_ROWS):
                yield rows

    def events(self, *, after: int = 0, until: int | None = None, tags: Sequence[str] | None = None,
               limit: int | None = None) -> Iterator[StoredEvent]:
        where, args = self._range(after, until)
        if tags is not None:
            where += " AND tag = ANY(%s)"
            args.append(list(tags))
        sql = _SELECT_EVENTS + where + " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT %s"
            args.append(limit)
        for rows in self._stream(sql, args):
            yield from map(_row_to_event, rows)

    def chunks(self, *, after: int = 0, until: int | None = None) -> Iterator[EventChunk]:
        where, args = self._range(after, until)
        for rows in self._stream(_SELECT_ENVELOPES + where + " ORDER BY seq", args):
            seqs, epochs, recorded, tags, schemas, payloads = zip(*rows)
            yield EventChunk(seqs, epochs, recorded, decode_many(seqs, tags, schemas, payloads))

    def replay_parts(self, *, after: int = 0, until: int | None = None) -> Iterator[EventChunk | StepRun]:
        # Every event decoded: the SQLite backend's step-run shortcut reads SQLite's stored text.
        return self.chunks(after=after, until=until)

    def checkpoint_events(self, checkpoint_id: str) -> list[StoredEvent]:
        rows = self._conn.execute(_SELECT_EVENTS + " WHERE run = %s AND checkpoint_id = %s ORDER BY seq",
                                  (self._run, checkpoint_id)).fetchall()
        return [_row_to_event(r) for r in rows]

    def stored_ids(self, event_ids: Sequence[str]) -> dict[str, int]:
        """``event_id -> seq`` for those of ``event_ids`` already stored in this run."""
        if not event_ids:
            return {}
        rows = self._conn.execute(f"SELECT event_id, seq FROM {EVENTS} WHERE run = %s AND event_id = ANY(%s)",
                                  (self._run, list(event_ids))).fetchall()
        return dict(rows)

    def snapshot_seq(self, *, at_most: int, projection_version: int) -> int:
        return self._one(f"SELECT max(seq) FROM {SCHEMA}.snapshots WHERE run = %s AND seq <= %s "
                         "AND projection_version = %s", (self._run, at_most, projection_version)) or 0

    def snapshot(self, *, at_most: int, projection_version: int) -> Snapshot | None:
        row = self._conn.execute(
            f"SELECT seq, state FROM {SCHEMA}.snapshots WHERE run = %s AND seq <= %s AND projection_version = %s "
            "ORDER BY seq DESC LIMIT 1", (self._run, at_most, projection_version)).fetchone()
        return Snapshot(seq=row[0], projection_version=projection_version, state=bytes(row[1])) if row else None

    def snapshot_count(self, *, projection_version: int) -> int:
        return self._one(f"SELECT count(*) FROM {SCHEMA}.snapshots WHERE run = %s AND projection_version = %s",
                         (self._run, projection_version))

    def read_model_seq(self, *, version: int) -> int | None:
        stored_version, seq = self.read_model_fact("version"), self.read_model_fact("seq")
        if stored_version is None or seq is None or int(stored_version) != version:
            return None
        return int(seq)

    def read_model_fact(self, key: str) -> bytes | None:
        value = self._one(f"SELECT value FROM {SCHEMA}.rm_facts WHERE run = %s AND key = %s", (self._run, key))
        return bytes(value) if value is not None else None

    def read_model_checkpoint(self, checkpoint_id: str) -> bytes | None:
        value = self._one(f"SELECT state FROM {SCHEMA}.rm_checkpoints WHERE run = %s AND checkpoint_id = %s",
                          (self._run, checkpoint_id))
        return bytes(value) if value is not None else None

    def read_model_checkpoints(self) -> list[bytes]:
        rows = self._conn.execute(f"SELECT state FROM {SCHEMA}.rm_checkpoints WHERE run = %s ORDER BY started_seq",
                                  (self._run,)).fetchall()
        return [bytes(r[0]) for r in rows]

    def read_model_attempts(self) -> list[bytes]:
        rows = self._conn.execute(f"SELECT state FROM {SCHEMA}.rm_attempts WHERE run = %s ORDER BY epoch",
                                  (self._run,)).fetchall()
        return [bytes(r[0]) for r in rows]

    def health(self, *, thorough: bool = False) -> StoreHealth:
        count, first, last, newest_epoch = self._conn.execute(
            f"SELECT count(*), COALESCE(min(seq), 1), COALESCE(max(seq), 0), COALESCE(max(epoch), 0) "
            f"FROM {EVENTS} WHERE run = %s", (self._run,)).fetchone()
        last_seq, max_epoch = self._conn.execute(
            f"SELECT last_seq, max_epoch FROM {SCHEMA}.runs WHERE run = %s", (self._run,)).fetchone()
        problems = []
        if last_seq != last:
            problems.append(f"runs.last_seq is {last_seq} but the newest stored event is seq {last}")
        if thorough:
            dupes = self._one(f"SELECT count(*) FROM (SELECT event_id FROM {EVENTS} WHERE run = %s "
                              "GROUP BY event_id HAVING count(*) > 1) d", (self._run,))
            if dupes:
                problems.append(f"{dupes} event id(s) stored more than once")
        return StoreHealth(integrity=problems or ["ok"], events=count, first_seq=first, last_seq=last,
                           max_epoch=max_epoch, newest_event_epoch=newest_epoch)
