"""The blob store of a run that has none: a PostgreSQL run whose ``run.started`` recorded no ``--blobs``.

A run in a database has no directory to keep shard files next to its ledger, so its
blobs live where ``--blobs`` says. Until one is recorded, reading the log, projecting
and validating ids all work; any operation on a blob refuses in one line, saying so.
"""

from __future__ import annotations

from typing import BinaryIO, Iterator, NoReturn

from ledger.blobs import BlobStore, BlobWriter
from ledger.errors import LedgerError


class NoBlobStore(BlobStore):
    """Stands in for the blob store of a run that records none (every blob operation raises)."""

    def __init__(self, run: str) -> None:
        self.run = run

    def _refuse(self, location: str) -> NoReturn:
        raise LedgerError(
            f"{self.run} records no blob store, so {location} has nowhere to live; give the run one with "
            "`ckpt-ledger train --blobs DIR|s3://BUCKET/PREFIX` (a run in a database has no directory of its own)"
        )

    def open_atomic(self, location: str) -> BlobWriter:
        self._refuse(location)

    def open_read(self, location: str) -> BinaryIO:
        self._refuse(location)

    def size(self, location: str) -> int | None:
        self._refuse(location)

    def exists(self, location: str) -> bool:
        self._refuse(location)

    def delete(self, location: str) -> None:
        self._refuse(location)

    def list_files(self) -> Iterator[str]:
        return iter(())  # nothing is stored: audit finds no stray file
