"""``Checkpointer``: coordinated sharded checkpoints through the ledger, saved and loaded.

The jobs live in their own modules; this facade wires them for the trainer:

* :mod:`trainer.checkpoint_storage` — the DCP writer/reader: one raw-layout file per rank
  through the :class:`~ledger.BlobStore`, hashed while written;
* :mod:`trainer.checkpoint_commit` — the two-phase protocol (begin, write, decide);
* :mod:`trainer.background_save` — one checkpoint in flight on a writer thread;
* :mod:`trainer.checkpoint_candidates` — verify a committed checkpoint, then load it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ledger import BlobStore, LocalBlobStore, RetentionPolicy
from trainer.background_save import (
    BackgroundCheckpointError,
    BackgroundSave,
    CheckpointTiming,
    raise_failure,
)
from trainer.checkpoint_candidates import BadShard, Candidate, VerifiedFiles, load_candidate, verify_candidate
from trainer.checkpoint_commit import CommitProtocol, RankReport, SaveOutcome, checkpoint_id_for
from trainer.checkpoint_storage import DCP_METADATA_FILE
from trainer.recorder import Recorder
from trainer.process_group import DistContext, new_side_group
from trainer.staging import StagingArea

__all__ = [
    "BackgroundCheckpointError", "BadShard", "Candidate", "CheckpointTiming", "Checkpointer", "DCP_METADATA_FILE",
    "RankReport", "SaveOutcome", "checkpoint_id_for",
]


class Checkpointer:
    """Saves and loads DCP checkpoints through the ledger's two-phase protocol.

    :meth:`save` is synchronous. :meth:`save_async` holds the training thread only for a
    snapshot into reused staging buffers; ``checkpoint.started``, writing, the reports to
    rank 0 and the commit run on a background thread, on a process group of its own. At
    most one checkpoint is in flight: collect it (:meth:`poll` / :meth:`wait`) before
    starting another. ``blobs`` is where the files go (a path means a local store there).
    ``upload_bar``: rank 0 draws a bar while its file is written, on a terminal.
    """

    def __init__(self, ctx: DistContext, blobs: BlobStore | str | os.PathLike[str], recorder: Recorder | None, *,
                 stack: str, topology: dict[str, int], retention: RetentionPolicy, background: bool = False,
                 codec: str = "none", upload_bar: bool = False) -> None:
        self.ctx = ctx
        self.blobs = blobs if isinstance(blobs, BlobStore) else LocalBlobStore(blobs)
        self._protocol = CommitProtocol(ctx, self.blobs, recorder, stack=stack, topology=topology,
                                        retention=retention, codec=codec, upload_bar=upload_bar)
        self.recorder: Recorder = self._protocol.recorder  # a NullRecorder on ranks that record nothing
        self._tries: dict[int, int] = {}  # step -> checkpoints begun at it (an aborted one may be retried)
        self.timings: list[CheckpointTiming] = []
        # Collective: every rank builds the checkpointer at the same point of setup.
        self._side_group = new_side_group() if background else None
        self._staging = StagingArea()
        self._background = BackgroundSave()
        self._verified = VerifiedFiles()

    @property
    def staging(self) -> StagingArea:
        """The reused host buffers of asynchronous saves."""
        return self._staging

    def save(self, state: dict[str, Any], *, step: int, epoch: int, started: float | None = None) -> SaveOutcome:
        """Write ``state`` on every rank and commit it through rank 0 (collective, blocking).

        ``started``: when the caller began the checkpoint (``time.perf_counter()``, e.g. before
        it gathered the state dicts), so the recorded stall covers all of it; default now.
        A background save must have been collected first (:meth:`wait`).
        """
        started = time.perf_counter() if started is None else started
        self._require_none_in_flight()
        checkpoint_id = self._next_id(step, epoch)
        outcome = self._protocol.begin(checkpoint_id, step, group=None)
        written = 0
        if outcome is None:
            outcome, written = self._protocol.complete(state, checkpoint_id, step, epoch, started, group=None)
        self.timings.append(CheckpointTiming(checkpoint_id, step, time.perf_counter() - started, outcome.durable_s,
                                             written, outcome.committed, synchronous=True))
        return outcome

    def save_async(self, state: dict[str, Any], *, step: int, epoch: int,
                   started: float | None = None) -> SaveOutcome | None:
        """Snapshot ``state`` and write it in the background (nothing durable happens on this thread).

        Always returns ``None``: the outcome — committed, aborted or fenced — comes from
        :meth:`poll` / :meth:`wait`. The caller must first collect any previous outcome.
        """
        if self._side_group is None:
            raise RuntimeError("this Checkpointer was built without a background writer")
        self._require_none_in_flight()
        started = time.perf_counter() if started is None else started
        snapshot = self._staging.stage(state)
        checkpoint_id = self._next_id(step, epoch)
        group, protocol = self._side_group, self._protocol

        def job(after_begin) -> tuple[SaveOutcome, int]:  # noqa: ANN001 - the flight's hook runner
            fenced = protocol.begin(checkpoint_id, step, group=group)
            if fenced is not None:
                return fenced, 0
            return protocol.complete(snapshot, checkpoint_id, step, epoch, started, group, after_begin=after_begin)

        self._background.start(checkpoint_id, step, time.perf_counter() - started, job)
        return None

    @property
    def in_flight(self) -> str | None:
        """The id of the checkpoint being written in the background, if any."""
        flight = self._background.flight
        return None if flight is None else flight.checkpoint_id

    def record_metric(self, name: str, value: float, *, step: int, checkpoint_id: str | None) -> None:
        """Record ``metric.recorded`` (rank 0; a no-op elsewhere), after ``checkpoint.started`` of ``checkpoint_id``.

        For the checkpoint in flight the background writer appends it, in order; otherwise now.
        """
        recorder, flight = self.recorder, self._background.flight

        def record() -> None:
            recorder.metric(name, value, step, checkpoint_id)

        if flight is None or flight.checkpoint_id != checkpoint_id or not flight.after_begin(record):
            record()

    def poll(self) -> SaveOutcome | None:
        """The outcome of the background save if it has finished (non-blocking); else ``None``."""
        flight = self._background.poll()
        return None if flight is None else self._collected(flight)

    def wait(self, timeout_s: float | None = None) -> SaveOutcome | None:
        """Block until the background save ends; its outcome (``None`` if none was in flight).

        Raises :class:`BackgroundCheckpointError` if the writer failed beyond a recorded abort.
        """
        flight = self._background.wait(timeout_s)
        return None if flight is None else self._collected(flight)

    def verify(self, candidate: Candidate) -> list[BadShard]:
        """Every shard of ``candidate`` that is missing or does not hash as recorded (collective)."""
        return verify_candidate(self.ctx, self.blobs, candidate, self._verified)

    def load(self, candidate: Candidate, template: dict[str, Any]) -> None:
        """Read a verified checkpoint into ``template`` in place (collective)."""
        load_candidate(self.blobs, candidate, template, self._verified)

    def _collected(self, flight) -> SaveOutcome | None:  # noqa: ANN001 - an InFlightSave
        outcome = flight.outcome
        self.timings.append(CheckpointTiming(
            flight.checkpoint_id, flight.step, flight.stall_s, outcome.durable_s if outcome else None,
            flight.bytes, outcome is not None and outcome.committed, synchronous=False))
        raise_failure(flight)
        return outcome

    def _next_id(self, step: int, epoch: int) -> str:
        retry = self._tries.get(step, 0)
        self._tries[step] = retry + 1
        return checkpoint_id_for(step, epoch, retry)

    def _require_none_in_flight(self) -> None:
        """Refuse to start a save while the previous one is unclaimed (its buffers are still being read)."""
        if self._background.flight is not None:
            raise RuntimeError("a checkpoint is still in flight: collect it with wait() first")
