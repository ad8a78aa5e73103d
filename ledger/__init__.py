"""ckpt-ledger: an event-sourced checkpoint and state store for PyTorch training.

Every lifecycle fact of a run is appended to an SQLite event log; a pure
projection of that log decides resume, retention, best and latest.

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
from ledger.ledger import Attempt, Ledger
from ledger.retention import Deletion, RetentionPolicy
from ledger.store import LEDGER_FILE, StoredEvent
from ledger.view import View

__all__ = [
    "LEDGER_FILE",
    "Attempt",
    "BestRule",
    "BlobInfo",
    "BlobStore",
    "BlobWriter",
    "CheckpointNotFoundError",
    "CorruptBlobError",
    "CorruptLedgerError",
    "Deletion",
    "DuplicateCheckpointError",
    "FencedError",
    "IncompleteCheckpointError",
    "Ledger",
    "LedgerError",
    "LedgerNotFoundError",
    "LedgerWarning",
    "LedgerWriteError",
    "LocalBlobStore",
    "RetentionPolicy",
    "SchemaTooNewError",
    "StoredEvent",
    "UnknownEventError",
    "View",
]
