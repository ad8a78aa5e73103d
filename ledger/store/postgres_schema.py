"""The PostgreSQL ledger schema: one database, many runs, all tables in the ``ckpt_ledger`` schema.

Tables (every row keyed by ``run``, the run's name from ``?run=NAME``):

* ``schema_version`` — one row: ``version`` of this layout and the ``application``
  that created it. A newer version is refused (:class:`SchemaTooNewError`).
* ``runs`` — one row per run: ``max_epoch`` (the fencing token) and ``last_seq``
  (the newest seq). Every write transaction of a run starts by locking this row.
* ``events`` — primary key ``(run, seq)`` with seqs contiguous from 1 per run,
  ``UNIQUE (run, event_id)``; the payload is the event's JSON exactly as encoded.
* ``snapshots`` — materialized projections, ``(run, seq)``.
* ``rm_facts`` / ``rm_checkpoints`` / ``rm_attempts`` — the read model, kept by the
  append transaction (see :mod:`ledger.store.interface`).

The schema is created on the first writer open, in one transaction serialized by
an advisory lock (two writers opening an empty database at once create it once).
It is only created in an empty database or one that already is a ledger: a
database holding other tables is "not a ledger database" and is left untouched.
"""

from __future__ import annotations

import time

import psycopg

from ledger.errors import CorruptLedgerError, LedgerNotFoundError, SchemaTooNewError

SCHEMA = "ckpt_ledger"
APPLICATION = "ckpt-ledger"
#: The layout version this code writes and reads. Bump it with a migration in :data:`MIGRATIONS`.
SCHEMA_VERSION = 1
#: Older layout version -> the statements that bring it to the next version.
MIGRATIONS: dict[int, str] = {}
#: Key of the transaction-scoped advisory lock taken while creating or migrating the schema.
_CREATE_LOCK = 0x434B4C47  # "CKLG"

_DDL = f"""
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.schema_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version integer NOT NULL,
    application text NOT NULL,
    created_at double precision NOT NULL
);
CREATE TABLE {SCHEMA}.runs (
    run text PRIMARY KEY,
    max_epoch bigint NOT NULL DEFAULT 0 CHECK (max_epoch >= 0),
    last_seq bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    created_at double precision NOT NULL
);
CREATE TABLE {SCHEMA}.events (
    run text NOT NULL REFERENCES {SCHEMA}.runs (run),
    seq bigint NOT NULL CHECK (seq >= 1),
    event_id text NOT NULL,
    epoch bigint NOT NULL,
    recorded_at double precision NOT NULL,
    tag text NOT NULL,
    schema_version integer NOT NULL,
    checkpoint_id text,
    payload json NOT NULL,
    PRIMARY KEY (run, seq),
    UNIQUE (run, event_id)
);
CREATE INDEX events_by_checkpoint ON {SCHEMA}.events (run, checkpoint_id, seq) WHERE checkpoint_id IS NOT NULL;
CREATE INDEX events_by_tag ON {SCHEMA}.events (run, tag, seq);
CREATE TABLE {SCHEMA}.snapshots (
    run text NOT NULL REFERENCES {SCHEMA}.runs (run),
    seq bigint NOT NULL,
    projection_version integer NOT NULL,
    state bytea NOT NULL,
    PRIMARY KEY (run, seq)
);
CREATE TABLE {SCHEMA}.rm_facts (
    run text NOT NULL REFERENCES {SCHEMA}.runs (run),
    key text NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (run, key)
);
CREATE TABLE {SCHEMA}.rm_checkpoints (
    run text NOT NULL REFERENCES {SCHEMA}.runs (run),
    checkpoint_id text NOT NULL,
    started_seq bigint NOT NULL,
    step bigint NOT NULL,
    status text NOT NULL,
    state bytea NOT NULL,
    PRIMARY KEY (run, checkpoint_id)
);
CREATE INDEX rm_checkpoints_by_start ON {SCHEMA}.rm_checkpoints (run, started_seq);
CREATE TABLE {SCHEMA}.rm_attempts (
    run text NOT NULL REFERENCES {SCHEMA}.runs (run),
    epoch bigint NOT NULL,
    state bytea NOT NULL,
    PRIMARY KEY (run, epoch)
);
"""


def _schema_exists(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.schema_version",)).fetchone()
    return bool(row and row[0])


def _foreign_tables(conn: psycopg.Connection) -> int:
    """How many tables/views the database holds outside the system schemas and ours."""
    row = conn.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname <> %s "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%%'",
        (SCHEMA,),
    ).fetchone()
    return int(row[0]) if row else 0


def _stored_version(conn: psycopg.Connection, location: str) -> int:
    row = conn.execute(f"SELECT version, application FROM {SCHEMA}.schema_version").fetchone()
    if row is None or row[1] != APPLICATION:
        raise CorruptLedgerError(
            f"{location}: schema {SCHEMA} exists but was not created by ckpt-ledger; "
            "point at a ckpt-ledger database or use an empty one"
        )
    version = int(row[0])
    if version > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"{location} has ledger schema version {version}, this ckpt-ledger reads up to {SCHEMA_VERSION}; "
            "upgrade ckpt-ledger"
        )
    return version


def check_schema(conn: psycopg.Connection, location: str) -> None:
    """Readers: refuse a database that is not a ledger, or one with a newer schema. Writes nothing."""
    if not _schema_exists(conn):
        if _foreign_tables(conn):
            raise CorruptLedgerError(
                f"{location} is not a ckpt-ledger database (it holds other tables and no {SCHEMA} schema); "
                "check the database name"
            )
        raise LedgerNotFoundError(
            f"no ledger in {location} (the database is empty); a run creates it with "
            "`ckpt-ledger train --run-dir URL`"
        )
    version = _stored_version(conn, location)
    if version < SCHEMA_VERSION:
        raise SchemaTooNewError(  # an older layout: only a writer may migrate it
            f"{location} has ledger schema version {version}, older than this ckpt-ledger's {SCHEMA_VERSION}; "
            "open it once for writing (e.g. `ckpt-ledger train`) to migrate it"
        )


def ensure_schema(conn: psycopg.Connection, location: str) -> None:
    """Writers: create the schema in an empty database, migrate an older one, refuse a foreign or newer one.

    ``conn`` must be in autocommit mode; this runs its own transaction.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))
        if _schema_exists(conn):
            version = _stored_version(conn, location)
            while version < SCHEMA_VERSION:
                conn.execute(MIGRATIONS[version])
                version += 1
                conn.execute(f"UPDATE {SCHEMA}.schema_version SET version = %s", (version,))
            return
        if _foreign_tables(conn):
            raise CorruptLedgerError(
                f"{location} is not a ckpt-ledger database (it holds other tables); nothing was created: "
                "give ckpt-ledger a database of its own (createdb NAME)"
            )
        conn.execute(_DDL)
        conn.execute(
            f"INSERT INTO {SCHEMA}.schema_version (version, application, created_at) VALUES (%s, %s, %s)",
            (SCHEMA_VERSION, APPLICATION, time.time()),
        )
