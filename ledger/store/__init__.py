"""The ledger's storage: the only package that talks to a database.

* :mod:`ledger.store.interface` — the typed :class:`LedgerStore` / :class:`StoreReader`
  contract every backend implements (``ledger/`` codes against it only).
* :mod:`ledger.store.format` — the SQLite file: creation, format marker, damage checks.
* :mod:`ledger.store.log` — the SQLite backend and its one ``sqlite3`` error translator.
* :mod:`ledger.store.queries` — every SQL read.
* :mod:`ledger.store.raw` — raw SQL that bypasses every rule, for fault-injection tests and benchmark floors.
"""

from __future__ import annotations

from pathlib import Path

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
    StoredEvent,
    StoreHealth,
    StoreReader,
    read_consistent,
)


def open_store(run_dir: Path, *, read_only: bool) -> LedgerStore:
    """The store of a run directory (SQLite ``RUN_DIR/ledger.db``)."""
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
    "StoreHealth",
    "StoreReader",
    "StoredEvent",
    "open_store",
    "read_consistent",
]
