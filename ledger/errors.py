"""The one error hierarchy of ckpt-ledger.

Every error a user can see derives from :class:`LedgerError`. Where a built-in
exception fits, the subclass inherits it too, so callers may catch either.
Messages are one line and name the file, sequence number or checkpoint involved,
plus what the user can do about it.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of every ckpt-ledger error."""


class LedgerWarning(UserWarning):
    """Warnings emitted by ckpt-ledger (tests turn these into errors)."""


class FencedError(LedgerError):
    """An append carried an epoch older than the newest attempt: this writer is a zombie."""

    def __init__(self, message: str, *, epoch: int, fenced_by: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.fenced_by = fenced_by


class CorruptLedgerError(LedgerError, ValueError):
    """The ledger file is unreadable, foreign, or holds an event that cannot be decoded."""


class SchemaTooNewError(LedgerError, ValueError):
    """The ledger (or one of its events) was written by a newer ckpt-ledger than this one."""


class UnknownEventError(CorruptLedgerError):
    """The log holds an event tag this code does not know; it is never skipped."""


class LedgerNotFoundError(LedgerError, FileNotFoundError):
    """A read-only open found no ledger at the given run directory."""


class CheckpointNotFoundError(LedgerError, LookupError):
    """No checkpoint (or alias) of that name exists in the projection."""


class IncompleteCheckpointError(LedgerError, ValueError):
    """A commit was refused: not every expected rank has recorded its shards, or the checkpoint is not in flight."""


class DuplicateCheckpointError(LedgerError, ValueError):
    """A checkpoint id was begun again (ids are never reused, not even a dead attempt's)."""


class CorruptBlobError(LedgerError, IOError):
    """A stored blob is missing, truncated, or its content hash does not match the ledger."""

    def __init__(self, message: str, *, location: str, expected_hash: str | None, found_hash: str | None) -> None:
        super().__init__(message)
        self.location = location
        self.expected_hash = expected_hash
        self.found_hash = found_hash


class LedgerWriteError(LedgerError, OSError):
    """The ledger could not be written (disk full, I/O error, read-only file system)."""


class BlobStoreError(LedgerError, OSError):
    """The blob store could not be reached or answered with an error (not a verdict on a blob's content)."""


class BlobStoreTimeoutError(BlobStoreError, TimeoutError):
    """A blob-store call (a listing, a delete) did not finish within its deadline; it was cancelled."""


class LedgerUnavailableError(LedgerError, ConnectionError):
    """The ledger's database server could not be reached, refused the connection, or went away mid-run."""
