"""The ledger's storage: the only package that talks to a database.

* :mod:`ledger.store.interface` — the typed :class:`LedgerStore` / :class:`StoreReader`
  contract every backend implements (``ledger/`` codes against it only).
* :mod:`ledger.store.format` — the SQLite file: creation, format marker, damage checks.
* :mod:`ledger.store.log` — the SQLite backend and its one ``sqlite3`` error translator.
* :mod:`ledger.store.queries` — every SQL read.
* :mod:`ledger.store.postgres` — the PostgreSQL backend: many runs in one database (its layout in
  ``postgres_schema``, its reads in ``postgres_reader``, listing every run in ``postgres_runs``).
* :mod:`ledger.store.raw` — raw SQL that bypasses every rule, for fault-injection tests and benchmark floors.
"""

from __future__ import annotations

from pathlib import Path

from ledger.errors import LedgerError
from ledger.run_address import PostgresRun
from ledger.store.format import APPLICATION_ID, LEDGER_FILE, LEDGER_FORMAT
from ledger.store.interface import (
    OPERATOR_EPOCH,
    CheckpointRow,
    EventChunk,
    LedgerStore,
    ReadModelMaintainer,
    ReadModelRows,
    ReadRaced,
    Snapshot,
    StepRun,
    StoredEvent,
    StoreHealth,
    StoreReader,
    read_consistent,
)


def open_store(run_dir: Path | PostgresRun, *, read_only: bool) -> LedgerStore:
    """The store of a run: SQLite ``RUN_DIR/ledger.db``, or a run in a PostgreSQL database."""
    if isinstance(run_dir, PostgresRun):
        try:
            from ledger.store.postgres import PostgresStore
        except ImportError as exc:  # psycopg is the optional `postgres` extra
            raise LedgerError(f"{run_dir} is a PostgreSQL ledger, which needs psycopg ({exc}); "
                              "install it with: pip install 'ckpt-ledger[postgres]'") from None

        return PostgresStore(run_dir, read_only=read_only)
    from ledger.store.log import SqliteStore

    return SqliteStore(Path(run_dir) / LEDGER_FILE, read_only=read_only)


__all__ = [
    "APPLICATION_ID",
    "LEDGER_FILE",
    "LEDGER_FORMAT",
    "OPERATOR_EPOCH",
    "CheckpointRow",
    "EventChunk",
    "LedgerStore",
    "ReadModelMaintainer",
    "ReadModelRows",
    "ReadRaced",
    "Snapshot",
    "StepRun",
    "StoreHealth",
    "StoreReader",
    "StoredEvent",
    "open_store",
    "read_consistent",
]
