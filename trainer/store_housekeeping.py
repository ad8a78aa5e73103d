"""Rank 0's store housekeeping: retention's deletions after a commit, and one sweep of older epochs' strays.

Housekeeping is never what a checkpoint's durability depends on: the commit is already in
the log when it runs. So its failures are warnings, never a crash or a lost commit:

* **retention after a commit** deletes the blobs of checkpoints the policy drops (and of
  torn or aborted saves). If the store fails it (a delete past the store's housekeeping
  deadline, :mod:`ledger.store_deadline`), the commit stands; the deletion is already
  requested in the log, so the next pass — after the next commit, or ``gc`` — finishes it.
* **the older-epoch sweep** removes stray files under the directories of older attempts
  (a fenced job's unrecorded files, a crashed writer's temp files). Listing a whole blob
  store is O(files) and on a remote store may wait on a slow listing, so it runs once per
  attempt, on a thread of its own started when the attempt begins, and rank 0's recorder
  waits for it — bounded — when it closes. What it does not get to, ``gc`` removes.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from ledger import BlobStore, Ledger, LedgerError, View
from ledger.errors import BlobStoreError
from ledger.garbage import StrayFile, sweep_older_epochs

#: Seconds rank 0's recorder waits, when it closes, for an older-epoch sweep still running;
#: past it the sweep stops before its next delete and ``gc`` removes what is left.
SWEEP_WAIT_AT_CLOSE_S = 30.0


def is_store_failure(err: BaseException) -> bool:
    """Whether ``err`` is the blob store failing (not the ledger: a failed append must still stop the run)."""
    return isinstance(err, BlobStoreError) or (isinstance(err, OSError) and not isinstance(err, LedgerError))


def warn(message: str) -> None:
    """One warning line on stderr, as the trainer's other warnings."""
    print(f"[ckpt-ledger] warning: {' '.join(message.split())[:500]}", file=sys.stderr, flush=True)


@contextmanager
def store_failures_as_warnings(what: str, then: str) -> Iterator[None]:
    """Run the block; a store failure in it is one warning line (``what`` failed: why; ``then``), not an error."""
    try:
        yield
    except OSError as err:
        if not is_store_failure(err):
            raise
        warn(f"{what} could not finish: {err}; {then}")


class OlderEpochSweep:
    """The stray files of epochs older than this attempt's, removed once on a background thread.

    :meth:`start` begins it; :meth:`finish` waits for it (bounded) and stops it. ``project``
    reads the run's projection (the recorder's, under its lock); it is never called after
    :meth:`finish` returns, so the recorder may close its ledger then.
    """

    def __init__(self, blobs: BlobStore, project: Callable[[], View], epoch: int) -> None:
        self.blobs = blobs
        self.epoch = epoch
        self.removed: list[StrayFile] = []
        """What the sweep removed (complete once it is done)."""
        self.error: BaseException | None = None
        """Why the sweep stopped early, if it did."""
        self._project = project
        self._gate = threading.Lock()  # held while projecting: finish() waits for a projection under way
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"ckpt-ledger-sweep-e{epoch}", daemon=True)

    @classmethod
    def start(cls, ledger: Ledger, project: Callable[[], View], epoch: int) -> "OlderEpochSweep | None":
        """Begin sweeping ``ledger``'s blob store in the background (``None``: the run has no store yet)."""
        try:
            blobs = ledger.blobs  # resolved here, on the caller's thread: the sweep never uses the ledger handle
        except LedgerError:  # a database run that recorded no store: no files of it anywhere
            return None
        sweep = cls(blobs, project, epoch)
        sweep._thread.start()
        return sweep

    @property
    def done(self) -> bool:
        """Whether the sweep has ended (finished, failed or stopped)."""
        return not self._thread.is_alive()

    def finish(self, timeout_s: float = SWEEP_WAIT_AT_CLOSE_S) -> None:
        """Wait up to ``timeout_s`` for the sweep, then stop it (it deletes nothing more)."""
        self._thread.join(timeout_s)
        with self._gate:
            self._stopped = True
        if self._thread.is_alive():
            warn(f"sweeping older attempts' stray files from {self.blobs.describe()} was still running after "
                 f"{timeout_s:g} s and was stopped; `ckpt-ledger gc` removes what is left")

    def _keep_going(self) -> bool:
        return not self._stopped

    def _project_unless_stopped(self) -> View:
        with self._gate:
            if self._stopped:
                raise _Stopped
            return self._project()

    def _run(self) -> None:
        try:
            self.removed = sweep_older_epochs(self.blobs, self._project_unless_stopped, epoch=self.epoch,
                                              keep_going=self._keep_going)
        except _Stopped:
            pass
        except Exception as err:  # noqa: BLE001 - a background worker: it reports, and the run goes on
            self.error = err
            warn(f"sweeping older attempts' stray files from {self.blobs.describe()} stopped: "
                 f"{type(err).__name__}: {err}; `ckpt-ledger gc` removes what is left")


class _Stopped(Exception):
    """The recorder stopped waiting before the sweep read the projection."""
