"""Coordinated sharded checkpoints: every rank writes and hashes, rank 0 alone commits.

Save, as a transaction (every step collective):

1. rank 0 appends ``checkpoint.started`` naming every rank as an expected writer;
2. every rank writes its shard(s) through ``torch.distributed.checkpoint`` into the
   attempt-namespaced directory of the ledger's blob store, fsyncs, and hashes the
   files it wrote;
3. the facts (location, bytes, hash, codec) — or the rank's error — go to rank 0
   (``gather_object``);
4. rank 0 appends one ``shard.written`` per file and ``checkpoint.committed``, or
   ``checkpoint.aborted`` with every failing rank's reason; the outcome is broadcast.

A rank that dies mid-save breaks the collective: rank 0 records the abort and the
attempt fails; the next attempt resumes from the last committed checkpoint.

Asynchronous saves run step 1 and a snapshot of the state into reused host buffers
(:mod:`trainer.staging`) on the training thread, and steps 2-4 on a background thread
whose collectives use a process group of their own, so they never interleave with the
training loop's. One checkpoint at most is in flight; a failure in the background
still ends in ``checkpoint.aborted`` and is raised on the training thread.

Load: shard hashes are verified first (each rank checks a slice, everyone sees every
finding), then DCP reads the verified files back into the live (possibly sharded)
state.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from ledger import BlobStore, CorruptBlobError, IncompleteCheckpointError, LedgerError, LocalBlobStore, RetentionPolicy
from ledger.blobs import fsync_dir
from ledger.faults import crash_point
from ledger.projection import CheckpointState
from trainer.blob_fs import BlobStoreWriter, dcp_reader
from trainer.dcp_codec import writer_extensions
from trainer.journal import RunJournal, ShardFact
from trainer.process_group import DistContext, broadcast_object, gather_objects, new_side_group
from trainer.staging import StagingArea

#: The file DCP's coordinator writes last, describing where every item lives.
DCP_METADATA_FILE = ".metadata"


def checkpoint_id_for(step: int, epoch: int, retry: int = 0) -> str:
    """Ids are never reused: the attempt's epoch tells attempts apart, ``retry`` a second try at a step."""
    return f"step{step:06d}-e{epoch}" + (f"-r{retry}" if retry else "")


def _one_line(err: BaseException) -> str:
    """``Type: message`` on one line; for DCP's aggregated error, each failing rank's own error."""
    if isinstance(err, CheckpointException):
        # Each failure is (exception, stack summary).
        causes = "; ".join(f"rank {r}: {type(e[0]).__name__}: {e[0]}" for r, e in sorted(err.failures.items()))
        text = f"write failed on {causes}"
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:400]


@contextmanager
def _without_zip_crc32() -> Iterator[None]:
    """Let ``torch.save`` skip the zip CRC32 of every tensor it serializes, for the duration.

    DCP stores each tensor as a ``torch.save`` zip container, and computing the container's
    CRC32 costs ~17% of writing a large tensor to disk (measured: 200 MB fp32 to file +
    fsync, 1.01 s with it, 0.84 s without, 0.81 s raw). It protects nothing here: every
    file is hashed (xxh3-128) after the write and verified against the ledger before any
    load, and ``torch.load`` reads containers without CRC32s. The switch is process-wide
    torch config, so a ``torch.save`` elsewhere in the process while a checkpoint is being
    written also skips its CRC32 (its files stay loadable).
    """
    try:  # the switch exists since torch 2.6's serialization config; without it, CRC32s are computed
        from torch.utils.serialization import config as serialization_config
        save_config = serialization_config.save
        previous = save_config.compute_crc32
    except (ImportError, AttributeError):
        yield
        return
    save_config.compute_crc32 = False
    try:
        yield
    finally:
        save_config.compute_crc32 = previous


class RecordingWriter(FileSystemWriter):
    """DCP's file-system writer, remembering which files this rank wrote (so it can hash exactly those)."""

    def __init__(self, path: Path, codec: str = "none") -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, overwrite=True,
                         _extensions=writer_extensions(codec))
        self.written: list[str] = []

    def write_data(self, plan, planner):  # noqa: ANN001, ANN201 - DCP's signature
        """Write this rank's items (as DCP does, without zip CRC32s) and note the files written."""
        with _without_zip_crc32():
            future = super().write_data(plan, planner)
        for result in future.wait():  # the file-system writer completes synchronously
            name = result.storage_data.relative_path
            if name not in self.written:
                self.written.append(name)
        return future

    def finish(self, metadata, results) -> None:  # noqa: ANN001 - DCP's signature
        """The coordinator writes ``.metadata`` last; it is one of rank 0's shards."""
        super().finish(metadata, results)
        self.written.append(DCP_METADATA_FILE)


@dataclass(frozen=True, slots=True)
class RankReport:
    """What one rank tells the coordinator after writing: its files, or why it could not."""

    rank: int
    shards: tuple[ShardFact, ...]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SaveOutcome:
    """How a checkpoint ended, identical on every rank."""

    checkpoint_id: str
    step: int
    committed: bool
    reason: str | None = None
    fenced_by: int | None = None
    durable_s: float | None = None
    """Seconds from the start of the save to ``checkpoint.committed`` appended (rank 0's clock)."""

    @property
    def fenced(self) -> bool:
        """A newer attempt took over the run: nothing more may be recorded."""
        return self.fenced_by is not None


@dataclass(frozen=True, slots=True)
class Candidate:
    """A committed checkpoint as the ledger describes it, enough to verify and load it."""

    checkpoint_id: str
    step: int
    epoch: int
    world_size: int
    stack: str
    topology: dict[str, int]
    shards: tuple[ShardFact, ...]

    @classmethod
    def of(cls, ckpt: CheckpointState) -> "Candidate":
        """The candidate for a checkpoint of the projection."""
        return cls(
            checkpoint_id=ckpt.checkpoint_id, step=ckpt.step, epoch=ckpt.epoch, world_size=ckpt.world_size,
            stack=ckpt.stack, topology=dict(ckpt.topology),
            shards=tuple(ShardFact(s.rank, s.location, s.bytes, s.hash, s.codec) for s in ckpt.shards),
        )

    def directory(self) -> str:
        """The DCP directory: where the recorded ``.metadata`` shard lives."""
        for shard in self.shards:
            if shard.location.rsplit("/", 1)[-1] == DCP_METADATA_FILE:
                return shard.location.rsplit("/", 1)[0]
        raise CorruptBlobError(
            f"checkpoint {self.checkpoint_id} has no recorded {DCP_METADATA_FILE} shard; it cannot be read",
            location=f"{self.checkpoint_id}/{DCP_METADATA_FILE}", expected_hash=None, found_hash=None,
        )


@dataclass(frozen=True, slots=True)
class BadShard:
    """A shard that failed verification."""

    checkpoint_id: str
    location: str
    expected_hash: str
    found_hash: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class CheckpointTiming:
    """What one checkpoint cost this rank, for benchmarks and progress lines."""

    checkpoint_id: str
    step: int
    stall_s: float
    """Time the training thread spent on the checkpoint: waiting for the previous one to finish,
    gathering the state dicts, and for an async save the snapshot into staging buffers and
    ``checkpoint.started``; for a synchronous one, all of it."""
    durable_s: float | None
    """From the start of the call to ``checkpoint.committed`` appended (``None``: not committed)."""
    bytes: int
    """Bytes this rank wrote."""
    committed: bool
    synchronous: bool


class _InFlight:
    """The one asynchronous checkpoint being written: its thread and, once done, its result."""

    def __init__(self, checkpoint_id: str, step: int, started: float, stall_s: float) -> None:
        self.checkpoint_id = checkpoint_id
        self.step = step
        self.started = started
        self.stall_s = stall_s
        self.outcome: SaveOutcome | None = None
        self.error: BaseException | None = None
        self.bytes = 0
        self.done = threading.Event()
        self.thread: threading.Thread | None = None


class BackgroundCheckpointError(RuntimeError):
    """The background writer failed in a way that leaves this attempt unable to go on (e.g. a lost rank)."""


class Checkpointer:
    """Saves and loads DCP checkpoints through the ledger's two-phase protocol.

    :meth:`save` is synchronous. :meth:`save_async` holds the training thread only for
    a snapshot into reused staging buffers and ``checkpoint.started``; writing, hashing,
    fsync, the reports to rank 0 and the commit run on a background thread, on a
    process group of their own. At most one checkpoint is in flight: starting another
    (or a synchronous one) first waits for it. Outcomes of background saves are picked
    up with :meth:`poll` / :meth:`wait`.
    """

    def __init__(self, ctx: DistContext, run_dir: str, journal: RunJournal | None, *, stack: str,
                 topology: dict[str, int], retention: RetentionPolicy, background: bool = False,
                 codec: str = "none", blobs: BlobStore | None = None) -> None:
        self.ctx = ctx
        self.blobs = blobs if blobs is not None else LocalBlobStore(run_dir)
        self.journal = journal
        self.stack = stack
        self.topology = topology
        self.retention = retention
        self.codec = codec
        self._tries: dict[int, int] = {}  # step -> checkpoints begun at it (an aborted one may be retried)
        self.timings: list[CheckpointTiming] = []
        # Collective: every rank builds the checkpointer at the same point of setup.
        self._side_group = new_side_group() if background else None
        self._staging = StagingArea()
        self._in_flight: _InFlight | None = None

    @property
    def staging(self) -> StagingArea:
        """The reused host buffers of asynchronous saves."""
        return self._staging

    # -- save ----------------------------------------------------------------------------------

    def save(self, state: dict[str, Any], *, step: int, epoch: int, started: float | None = None) -> SaveOutcome:
        """Write ``state`` on every rank and commit it through rank 0 (collective, blocking).

        ``started``: when the caller began the checkpoint (``time.perf_counter()``, e.g. before
        it gathered the state dicts), so the recorded stall covers all of it; default now.
        A background save must have been collected first (:meth:`wait`).
        """
        started = time.perf_counter() if started is None else started
        self._require_none_in_flight()
        checkpoint_id, fenced = self._begin(step, epoch)
        if fenced is not None:
            return fenced
        outcome, written = self._complete(state, checkpoint_id, step, epoch, started, group=None)
        elapsed = time.perf_counter() - started
        self.timings.append(CheckpointTiming(checkpoint_id, step, elapsed, outcome.durable_s, written,
                                             outcome.committed, synchronous=True))
        return outcome

    def save_async(self, state: dict[str, Any], *, step: int, epoch: int,
                   started: float | None = None) -> SaveOutcome | None:
        """Snapshot ``state`` and write it in the background (collective on the training thread).

        Returns ``None`` when the checkpoint is under way, or the outcome right away when it
        could not start (fenced). The caller must first collect any previous outcome with
        :meth:`wait` (at most one checkpoint is in flight; its staging buffers are reused).
        """
        if self._side_group is None:
            raise RuntimeError("this Checkpointer was built without a background writer")
        self._require_none_in_flight()
        started = time.perf_counter() if started is None else started
        snapshot = self._staging.stage(state)
        checkpoint_id, fenced = self._begin(step, epoch)
        if fenced is not None:
            return fenced
        flight = _InFlight(checkpoint_id, step, started, stall_s=0.0)

        def run() -> None:
            try:
                flight.outcome, flight.bytes = self._complete(snapshot, checkpoint_id, step, epoch, started,
                                                              group=self._side_group)
            except BaseException as err:  # noqa: BLE001 - handed to the training thread by wait()/poll()
                flight.error = err
            finally:
                flight.done.set()

        flight.thread = threading.Thread(target=run, name=f"ckpt-writer-{checkpoint_id}", daemon=True)
        flight.thread.start()
        flight.stall_s = time.perf_counter() - started
        self._in_flight = flight
        return None

    @property
    def in_flight(self) -> str | None:
        """The id of the checkpoint being written in the background, if any."""
        return None if self._in_flight is None else self._in_flight.checkpoint_id

    def poll(self) -> SaveOutcome | None:
        """The outcome of the background save if it has finished (non-blocking); else ``None``."""
        if self._in_flight is None or not self._in_flight.done.is_set():
            return None
        return self.wait()

    def wait(self, timeout_s: float | None = None) -> SaveOutcome | None:
        """Block until the background save ends; its outcome (``None`` if none was in flight).

        Raises :class:`BackgroundCheckpointError` if the writer failed beyond a recorded abort.
        """
        flight = self._in_flight
        if flight is None:
            return None
        if not flight.done.wait(timeout_s):
            raise BackgroundCheckpointError(
                f"checkpoint {flight.checkpoint_id} is still being written after {timeout_s:.0f} s")
        self._in_flight = None
        durable = flight.outcome.durable_s if flight.outcome is not None else None
        committed = flight.outcome is not None and flight.outcome.committed
        self.timings.append(CheckpointTiming(flight.checkpoint_id, flight.step, flight.stall_s, durable,
                                             flight.bytes, committed, synchronous=False))
        if flight.error is not None:
            raise BackgroundCheckpointError(
                f"background checkpoint {flight.checkpoint_id} failed: {_one_line(flight.error)}") from flight.error
        return flight.outcome

    def _require_none_in_flight(self) -> None:
        """Refuse to start a save while the previous one is unclaimed (its buffers are still being read)."""
        if self._in_flight is not None:
            raise RuntimeError("a checkpoint is still in flight: collect it with wait() first")

    def _begin(self, step: int, epoch: int) -> tuple[str, SaveOutcome | None]:
        """Phase 1 on the training thread: rank 0 appends ``checkpoint.started``; all learn if fenced."""
        retry = self._tries.get(step, 0)
        self._tries[step] = retry + 1
        checkpoint_id = checkpoint_id_for(step, epoch, retry)
        fenced_by = None
        if self.journal is not None and not self.journal.begin_checkpoint(
                checkpoint_id, step, self.ctx.world_size, self.stack, self.topology):
            fenced_by = self.journal.fenced_by
        fenced_by = broadcast_object(fenced_by)
        if fenced_by is not None:  # a newer attempt owns the run: nobody writes
            return checkpoint_id, SaveOutcome(checkpoint_id, step, committed=False, reason="fenced",
                                              fenced_by=fenced_by)
        return checkpoint_id, None

    def _complete(self, state: dict[str, Any], checkpoint_id: str, step: int, epoch: int, started: float,
                  group: dist.ProcessGroup | None) -> tuple[SaveOutcome, int]:
        """Phase 2 (any thread; collective on ``group``): write, hash, report, decide; ``(outcome, bytes)``.

        If anything raises before rank 0 has recorded how the checkpoint ended, rank 0 records
        ``checkpoint.aborted`` with the error before it propagates: a started checkpoint always ends.
        """
        decided = False
        doing = "writing its shards"
        try:
            report = self._write_and_hash(state, self.blobs.checkpoint_dir(checkpoint_id, epoch), group)
            written = sum(s.bytes for s in report.shards)
            doing = "collecting shard reports"
            reports = gather_objects(report, group=group)
            outcome = None
            if self.journal is not None and reports is not None:
                doing = "committing"
                outcome = self._decide(self.journal, checkpoint_id, step, reports, started)
            decided = True
            if outcome is not None and outcome.committed and self.journal is not None:
                crash_point("trainer.after_commit")
                self.journal.apply_retention(self.retention)
            return broadcast_object(outcome, group=group), written
        except BaseException as err:
            if self.journal is not None and not decided:
                reason = (f"lost a rank while {doing}: {err}" if isinstance(err, RuntimeError)
                          else f"failed while {doing}: {_one_line(err)}")
                self._abort_quietly(self.journal, checkpoint_id, reason)
            raise

    @staticmethod
    def _abort_quietly(journal: RunJournal, checkpoint_id: str, reason: str) -> None:
        """Record an abort on the way out of a failure; the original error matters more than this record."""
        try:
            journal.abort_checkpoint(checkpoint_id, reason)
        except LedgerError as err:
            print(f"[ckpt-ledger] could not record the abort of {checkpoint_id}: {err}", file=sys.stderr, flush=True)

    def _write_and_hash(self, state: dict[str, Any], location: str, group: dist.ProcessGroup | None) -> RankReport:
        if not isinstance(self.blobs, LocalBlobStore):
            return self._write_to_store(state, location, group)
        rank = self.ctx.rank
        directory = self.blobs.path(location)
        writer = RecordingWriter(directory, self.codec)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            dcp.save(state, storage_writer=writer, process_group=group)
            fsync_dir(directory)
            shards = []
            for name in writer.written:
                digest, size = self.blobs.hash_file(f"{location}/{name}")
                shards.append(ShardFact(rank=rank, location=f"{location}/{name}", bytes=size, hash=digest))
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - reported; the coordinator aborts with it
            # (DCP's CheckpointException derives from BaseException, so it is named explicitly.)
            for name in writer.written:  # the checkpoint will be aborted: remove what this rank wrote
                self.blobs.delete(f"{location}/{name}")
            return RankReport(rank, (), _one_line(err))
        crash_point("trainer.after_shard_write")
        crash_point(f"trainer.rank{rank}.after_shard_write")
        return RankReport(rank, tuple(shards))

    def _write_to_store(self, state: dict[str, Any], location: str, group: dist.ProcessGroup | None) -> RankReport:
        """Write this rank's shards straight into a (remote) blob store, hashed while uploaded.

        Each file is published whole when complete (an S3 object on completing its upload);
        a failure leaves nothing visible, and whatever this rank did publish is removed.
        """
        rank = self.ctx.rank
        writer = BlobStoreWriter(self.blobs, location, self.codec)
        try:
            with _without_zip_crc32():
                dcp.save(state, storage_writer=writer, process_group=group)
            shards = tuple(ShardFact(rank=rank, location=loc, bytes=size, hash=digest)
                           for loc, (size, digest) in writer.fs.written.items())
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - reported; the coordinator aborts with it
            for loc in writer.fs.written:
                try:
                    self.blobs.delete(loc)
                except LedgerError:
                    pass  # the store is unreachable: gc removes it once the abort is recorded
            return RankReport(rank, (), _one_line(err))
        crash_point("trainer.after_shard_write")
        crash_point(f"trainer.rank{rank}.after_shard_write")
        return RankReport(rank, shards)

    def _decide(self, journal: RunJournal, checkpoint_id: str, step: int, reports: list[RankReport],
                started: float) -> SaveOutcome:
        """Rank 0: commit when every rank wrote its files, abort with every failing rank's reason otherwise."""
        by_error: dict[str, list[int]] = {}
        for report in reports:
            if report.error is not None:  # DCP reports one rank's failure on every rank: group them
                by_error.setdefault(report.error, []).append(report.rank)
        if by_error:
            reason = "; ".join(f"reported by rank(s) {','.join(map(str, ranks))}: {error}"
                               for error, ranks in by_error.items())
            journal.abort_checkpoint(checkpoint_id, reason)
            return SaveOutcome(checkpoint_id, step, committed=False, reason=reason, fenced_by=journal.fenced_by)
        try:
            committed = journal.commit_checkpoint(checkpoint_id, [s for r in reports for s in r.shards])
        except IncompleteCheckpointError as err:
            journal.abort_checkpoint(checkpoint_id, str(err))
            return SaveOutcome(checkpoint_id, step, committed=False, reason=str(err))
        if not committed:
            return SaveOutcome(checkpoint_id, step, committed=False, reason="fenced", fenced_by=journal.fenced_by)
        durable_s = time.perf_counter() - started
        return SaveOutcome(checkpoint_id, step, committed=True, fenced_by=journal.fenced_by, durable_s=durable_s)

    # -- verify and load -------------------------------------------------------------------------

    def verify(self, candidate: Candidate) -> list[BadShard]:
        """Every shard of ``candidate`` that is missing or does not hash as recorded (collective)."""
        bad: list[BadShard] = []
        for index, shard in enumerate(candidate.shards):
            if index % self.ctx.world_size != self.ctx.rank:
                continue
            try:
                self.blobs.verify(shard.location, shard.hash, shard.bytes)
            except CorruptBlobError as err:
                bad.append(BadShard(candidate.checkpoint_id, shard.location, shard.hash, err.found_hash, str(err)))
        everyone: list[list[BadShard]] = [[] for _ in range(self.ctx.world_size)]
        dist.all_gather_object(everyone, bad)
        return sorted((b for found in everyone for b in found), key=lambda b: b.location)

    def load(self, candidate: Candidate, template: dict[str, Any]) -> None:
        """Read a verified checkpoint into ``template`` in place (collective)."""
        # One registry reads every codec: each item's is recorded in the checkpoint's .metadata.
        dcp.load(template, storage_reader=dcp_reader(self.blobs, candidate.directory()))
