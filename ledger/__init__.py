"""ckpt-ledger: an event-sourced checkpoint and state store for PyTorch training.

Every lifecycle fact of a run is appended to an SQLite event log; a pure
projection of that log decides resume, retention, best and latest.

=========  ==========================================================================
born       ``trainer/`` (a step, a save, a signal) and the CLI's operator commands
recorded   ``ledger.Ledger`` over ``ledger/store/`` (the only code that touches the database)
decided    ``ledger/projection.py`` (the fold) and ``ledger/decisions.py`` (pure functions of it)
shown      ``cli/`` (inspect, replay, audit, tail, timeline), via ``Ledger``'s read API only
=========  ==========================================================================

>>> from ledger import Ledger
>>> led = Ledger.open("runs/exp1")                 # doctest: +SKIP
>>> led.projection().resume                       # doctest: +SKIP
"""

from ledger.blobs import BlobInfo, BlobStore, BlobWriter, LocalBlobStore
from ledger.decisions import BestRule
from ledger.errors import (
    CheckpointNotFoundError,
    CorruptBlobError,
    CorruptLedgerError,
    DuplicateCheckpointError,
    FencedError,
    IncompleteCheckpointError,
    LedgerError,
    LedgerNotFoundError,
    LedgerWarning,
    LedgerWriteError,
    SchemaTooNewError,
    UnknownEventError,
)
from ledger.health import Anomaly, LedgerHealth
from ledger.ledger import Attempt, Ledger
from ledger.retention import Deletion, RetentionPolicy
from ledger.statuses import AnomalyKind, AttemptStatus, CheckpointStatus, Severity
from ledger.store import LEDGER_FILE, StoredEvent
from ledger.view import View

__all__ = [
    "LEDGER_FILE",
    "Anomaly",
    "AnomalyKind",
    "Attempt",
    "AttemptStatus",
    "BestRule",
    "BlobInfo",
    "BlobStore",
    "BlobWriter",
    "CheckpointNotFoundError",
    "CheckpointStatus",
    "CorruptBlobError",
    "CorruptLedgerError",
    "Deletion",
    "DuplicateCheckpointError",
    "FencedError",
    "IncompleteCheckpointError",
    "Ledger",
    "LedgerError",
    "LedgerHealth",
    "LedgerNotFoundError",
    "LedgerWarning",
    "LedgerWriteError",
    "LocalBlobStore",
    "RetentionPolicy",
    "SchemaTooNewError",
    "Severity",
    "StoredEvent",
    "UnknownEventError",
    "View",
]
