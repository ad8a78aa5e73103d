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

Load: shard hashes are verified first (each rank checks a slice, everyone sees every
finding), then DCP reads the verified files back into the live (possibly sharded)
state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from ledger import CorruptBlobError, IncompleteCheckpointError, LocalBlobStore, RetentionPolicy
from ledger.blobs import fsync_dir
from ledger.faults import crash_point
from ledger.projection import CheckpointState
from trainer.journal import RunJournal, ShardFact
from trainer.process_group import DistContext, broadcast_object, gather_objects

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


class RecordingWriter(FileSystemWriter):
    """DCP's file-system writer, remembering which files this rank wrote (so it can hash exactly those)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True, overwrite=True)
        self.written: list[str] = []

    def write_data(self, plan, planner):  # noqa: ANN001, ANN201 - DCP's signature
        """Write this rank's items (as DCP does) and note the files written."""
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


class Checkpointer:
    """Saves and loads DCP checkpoints through the ledger's two-phase protocol."""

    def __init__(self, ctx: DistContext, run_dir: str, journal: RunJournal | None, *, stack: str,
                 topology: dict[str, int], retention: RetentionPolicy) -> None:
        self.ctx = ctx
        self.blobs = LocalBlobStore(run_dir)
        self.journal = journal
        self.stack = stack
        self.topology = topology
        self.retention = retention
        self._tries: dict[int, int] = {}  # step -> checkpoints begun at it (an aborted one may be retried)

    # -- save ----------------------------------------------------------------------------------

    def save(self, state: dict[str, Any], *, step: int, epoch: int) -> SaveOutcome:
        """Write ``state`` on every rank and commit it through rank 0 (collective)."""
        retry = self._tries.get(step, 0)
        self._tries[step] = retry + 1
        checkpoint_id = checkpoint_id_for(step, epoch, retry)
        fenced_by = None
        if self.journal is not None and not self.journal.begin_checkpoint(
                checkpoint_id, step, self.ctx.world_size, self.stack, self.topology):
            fenced_by = self.journal.fenced_by
        fenced_by = broadcast_object(fenced_by)
        if fenced_by is not None:  # a newer attempt owns the run: nobody writes
            return SaveOutcome(checkpoint_id, step, committed=False, reason="fenced", fenced_by=fenced_by)

        report = self._write_and_hash(state, self.blobs.checkpoint_dir(checkpoint_id, epoch))
        try:
            reports = gather_objects(report)
        except RuntimeError as err:  # a peer died mid-checkpoint: the process group is broken
            if self.journal is not None:
                self.journal.abort_checkpoint(checkpoint_id, f"lost a rank while collecting shard reports: {err}")
            raise
        outcome = None
        if self.journal is not None and reports is not None:
            outcome = self._decide(self.journal, checkpoint_id, step, reports)
        return broadcast_object(outcome)

    def _write_and_hash(self, state: dict[str, Any], location: str) -> RankReport:
        rank = self.ctx.rank
        directory = self.blobs.path(location)
        writer = RecordingWriter(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            dcp.save(state, storage_writer=writer)
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

    def _decide(self, journal: RunJournal, checkpoint_id: str, step: int, reports: list[RankReport]) -> SaveOutcome:
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
        crash_point("trainer.after_commit")
        journal.apply_retention(self.retention)
        return SaveOutcome(checkpoint_id, step, committed=True, fenced_by=journal.fenced_by)

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
        reader = FileSystemReader(self.blobs.path(candidate.directory()))
        dcp.load(template, storage_reader=reader)
