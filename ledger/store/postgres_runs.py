"""Reading every run of a PostgreSQL ledger database at once (``ckpt-ledger runs URL``).

One read-only ``REPEATABLE READ`` transaction and two queries, whatever the number of
runs: the runs with their read-model facts and newest attempt row, then the steps of
the checkpoints those facts name. Values are returned as stored (opaque bytes); the
ledger decodes them (:mod:`ledger.run_list`). A run whose read model is missing or
behind its log is folded through an ordinary :class:`~ledger.store.postgres.PostgresReader`
in the same transaction.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import psycopg

from ledger.run_address import PostgresRun
from ledger.store.postgres import connect, postgres_errors
from ledger.store.postgres_reader import PostgresReader
from ledger.store.postgres_schema import SCHEMA, check_schema


@dataclass(frozen=True, slots=True)
class StoredRun:
    """One run's row and its read-model facts, as stored."""

    run: str
    last_seq: int
    max_epoch: int
    created_at: float
    read_model_version: int | None
    read_model_seq: int | None
    summary: bytes | None
    run_info: bytes | None
    newest_attempt: bytes | None
    attempts: int


_RUNS = f"""
SELECT r.run, r.last_seq, r.max_epoch, r.created_at,
       (SELECT convert_from(value, 'UTF8') FROM {SCHEMA}.rm_facts f WHERE f.run = r.run AND f.key = 'version'),
       (SELECT convert_from(value, 'UTF8') FROM {SCHEMA}.rm_facts f WHERE f.run = r.run AND f.key = 'seq'),
       (SELECT value FROM {SCHEMA}.rm_facts f WHERE f.run = r.run AND f.key = 'summary'),
       (SELECT value FROM {SCHEMA}.rm_facts f WHERE f.run = r.run AND f.key = 'run'),
       (SELECT state FROM {SCHEMA}.rm_attempts a WHERE a.run = r.run ORDER BY a.epoch DESC LIMIT 1),
       (SELECT count(*) FROM {SCHEMA}.rm_attempts a WHERE a.run = r.run)
FROM {SCHEMA}.runs r
ORDER BY r.run
"""


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _bytes(value: object) -> bytes | None:
    return bytes(value) if value is not None else None  # type: ignore[arg-type]


class RunsSnapshot:
    """Every run of one database as of one read-only transaction (valid inside :func:`read_runs`)."""

    def __init__(self, conn: psycopg.Connection, location: str) -> None:
        self._conn = conn
        self._location = location

    def runs(self) -> list[StoredRun]:
        """Every run, by name."""
        return [
            StoredRun(run=r[0], last_seq=r[1], max_epoch=r[2], created_at=r[3], read_model_version=_int_or_none(r[4]),
                      read_model_seq=_int_or_none(r[5]), summary=_bytes(r[6]), run_info=_bytes(r[7]),
                      newest_attempt=_bytes(r[8]), attempts=r[9])
            for r in self._conn.execute(_RUNS).fetchall()
        ]

    def checkpoint_steps(self, wanted: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """``(run, checkpoint_id) -> step`` from the read model, for the pairs asked for."""
        if not wanted:
            return {}
        runs, ids = zip(*wanted)
        rows = self._conn.execute(
            f"SELECT c.run, c.checkpoint_id, c.step FROM {SCHEMA}.rm_checkpoints c "
            "JOIN unnest(%s::text[], %s::text[]) AS w(run, checkpoint_id) USING (run, checkpoint_id)",
            (list(runs), list(ids))).fetchall()
        return {(run, cid): step for run, cid, step in rows}

    def reader(self, run: str) -> PostgresReader:
        """A reader of one run inside this same transaction (to fold a run without a current read model)."""
        return PostgresReader(self._conn, run, self._location)


@contextlib.contextmanager
def read_runs(database: PostgresRun) -> Iterator[RunsSnapshot]:
    """Open ``database`` read-only and yield a consistent view of all its runs. Creates nothing."""
    location = database.database_url
    conn = connect(PostgresRun(database.dbname, None, database.user, database.host, database.port, database.params),
                   read_only=True)
    try:
        with postgres_errors(location, "list the runs"):
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            check_schema(conn, location)
            yield RunsSnapshot(conn, location)
            conn.execute("COMMIT")
    finally:
        conn.close()
