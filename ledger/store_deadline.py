"""Deadlines for store housekeeping: a listing or a delete that a stopped server cannot stretch.

Housekeeping (retention's deletions, the sweep of older attempts' stray files, ``gc``'s
listing) talks to the blob store outside the checkpoint's own write. On an object store
that stops answering, a client's own retries (botocore's attempts times s3fs's, each
waiting out a read timeout) add up to many minutes, and rank 0's background writer would
wait them out before the next checkpoint could begin. A :class:`Deadline` bounds one such
call as a whole: each request gets what is left of it and is cancelled when it runs out,
and a listing checks it between pages.
"""

from __future__ import annotations

import time

from ledger.errors import BlobStoreTimeoutError

#: Seconds one housekeeping call against a remote blob store (one listing, one delete, one
#: abort of an unfinished upload) may take; :attr:`FsspecBlobStore.housekeeping_deadline_s`.
HOUSEKEEPING_DEADLINE_S = 20.0


class Deadline:
    """The time left for one call, started when it is made; ``seconds=None`` never runs out."""

    def __init__(self, seconds: float | None, what: str) -> None:
        if seconds is not None and seconds <= 0:
            raise ValueError(f"a deadline must be positive seconds or None, got {seconds!r}")
        self.seconds = seconds
        self.what = what
        self._ends = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        """Seconds left (never negative), or ``None`` without a deadline."""
        return None if self._ends is None else max(0.0, self._ends - time.monotonic())

    def expired(self) -> bool:
        """Whether the time is up."""
        return self._ends is not None and time.monotonic() >= self._ends

    def error(self, progress: str = "") -> BlobStoreTimeoutError:
        """The one-line error for running out (``progress``: how far the call got)."""
        done = f" ({progress})" if progress else ""
        return BlobStoreTimeoutError(f"{self.what} did not finish within {self.seconds:g} s{done}: the store is "
                                     "not answering (stopped, frozen or overloaded)")

    def check(self, progress: str = "") -> None:
        """Raise :meth:`error` if the time is up (called between the pages of a listing)."""
        if self.expired():
            raise self.error(progress)
