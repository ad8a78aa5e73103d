"""The background save: one checkpoint written on a thread while training goes on.

The training thread hands over a snapshot (staging buffers) and returns; everything
durable — ``checkpoint.started``, the files, ``shard.written``, the commit or abort,
retention, and any metric that names the checkpoint — happens on the writer thread, in
that order, using a process group of its own so its collectives never interleave with
the training loop's. At most one checkpoint is in flight. The training thread picks up
the outcome with :meth:`BackgroundSave.poll` (at a step boundary) or
:meth:`BackgroundSave.wait`; a writer that fails beyond a recorded abort surfaces there
as :class:`BackgroundCheckpointError`. Fencing learned by the writer is in the recorder,
where the training loop looks at every step boundary.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from trainer.checkpoint_commit import SaveOutcome, one_line


class BackgroundCheckpointError(RuntimeError):
    """The background writer failed in a way that leaves this attempt unable to go on (e.g. a lost rank)."""


@dataclass(frozen=True, slots=True)
class CheckpointTiming:
    """What one checkpoint cost this rank, for benchmarks and progress lines."""

    checkpoint_id: str
    step: int
    stall_s: float
    """Time the training thread spent on the checkpoint: waiting for the previous one to finish,
    gathering the state dicts, and for an async save the snapshot into staging buffers; for a
    synchronous one, all of it."""
    durable_s: float | None
    """From the start of the call to ``checkpoint.committed`` appended (``None``: not committed)."""
    bytes: int
    """Bytes this rank wrote."""
    committed: bool
    synchronous: bool


#: The writer's job: given a way to run "after ``checkpoint.started``" hooks, return (outcome, bytes written).
WriterJob = Callable[[Callable[[], None]], "tuple[SaveOutcome, int]"]


class InFlightSave:
    """The one asynchronous checkpoint being written: its thread, facts to record after it began, its result."""

    def __init__(self, checkpoint_id: str, step: int, stall_s: float) -> None:
        self.checkpoint_id = checkpoint_id
        self.step = step
        self.stall_s = stall_s
        self.outcome: SaveOutcome | None = None
        self.error: BaseException | None = None
        self.bytes = 0
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._closed = False

    def after_begin(self, record: Callable[[], None]) -> bool:
        """Queue ``record`` to run on the writer once ``checkpoint.started`` is recorded, in order.

        ``False`` when the writer has finished with such records (the caller records it itself).
        """
        with self._lock:
            if self._closed:
                return False
            self._pending.append(record)
            return True

    def run_pending(self, *, last: bool = False) -> None:
        """Writer thread: record what was queued (``last``: and refuse more from now on)."""
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._closed = self._closed or last
                    return
            for record in batch:
                record()


class BackgroundSave:
    """Runs at most one :data:`WriterJob` on a thread and hands its outcome to the training thread."""

    def __init__(self) -> None:
        self._flight: InFlightSave | None = None

    @property
    def flight(self) -> InFlightSave | None:
        """The checkpoint being written (or written and not yet collected)."""
        return self._flight

    def start(self, checkpoint_id: str, step: int, stall_s: float, job: WriterJob) -> InFlightSave:
        """Start writing in the background; the caller must have collected the previous one."""
        if self._flight is not None:
            raise RuntimeError("a checkpoint is still in flight: collect it with wait() first")
        flight = InFlightSave(checkpoint_id, step, stall_s)

        def run() -> None:
            try:
                flight.outcome, flight.bytes = job(flight.run_pending)
            except BaseException as err:  # noqa: BLE001 - handed to the training thread by wait()/poll()
                flight.error = err
            finally:
                try:
                    flight.run_pending(last=True)  # facts queued while the commit ran
                except BaseException as err:  # noqa: BLE001 - same
                    flight.error = flight.error or err
                flight.done.set()

        self._flight = flight
        threading.Thread(target=run, name=f"ckpt-writer-{checkpoint_id}", daemon=True).start()
        return flight

    def poll(self) -> InFlightSave | None:
        """The finished checkpoint, collected (non-blocking); ``None`` if none is finished."""
        if self._flight is None or not self._flight.done.is_set():
            return None
        return self.wait()

    def wait(self, timeout_s: float | None = None) -> InFlightSave | None:
        """Block until the checkpoint in flight ends and collect it (``None`` if none was in flight).

        Raises :class:`BackgroundCheckpointError` if it is still running after ``timeout_s``;
        the caller raises the writer's own error (see :func:`raise_failure`).
        """
        flight = self._flight
        if flight is None:
            return None
        if not flight.done.wait(timeout_s):
            raise BackgroundCheckpointError(
                f"checkpoint {flight.checkpoint_id} is still being written after {timeout_s:.0f} s")
        self._flight = None
        return flight


def raise_failure(flight: InFlightSave) -> None:
    """Raise :class:`BackgroundCheckpointError` if ``flight``'s writer failed beyond a recorded abort."""
    if flight.error is not None:
        raise BackgroundCheckpointError(
            f"background checkpoint {flight.checkpoint_id} failed: {one_line(flight.error)}") from flight.error
