"""The two-phase checkpoint protocol: every rank writes, rank 0 alone records and decides.

One checkpoint, as a transaction (every step collective on the process group given):

1. **begin** — rank 0 appends ``checkpoint.started`` naming every rank as an expected
   writer (and flushes buffered steps before it); every rank learns whether the
   attempt was fenced, in which case nobody writes;
2. **write** — every rank writes its file through :class:`LedgerStorageWriter` into the
   attempt-namespaced directory of the blob store (hashed while written, durable on
   close) and reports its files — or its error — to rank 0 (``gather_object``);
3. **decide** — rank 0 appends one ``shard.written`` per file and
   ``checkpoint.committed``, or ``checkpoint.aborted`` with every failing rank's reason;
   the outcome is broadcast. Files that end up recorded nowhere (an abort, or a fenced
   commit) are removed by the rank that wrote them.

A rank that dies mid-save breaks the collective: rank 0 records the abort and the
attempt fails; the next attempt resumes from the last committed checkpoint.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ledger import BlobStore, IncompleteCheckpointError, LedgerError, RetentionPolicy
from ledger.faults import crash_point
from trainer.checkpoint_storage import LedgerStorageWriter
from trainer.recorder import NullRecorder, Recorder
from trainer.run_recorder import ShardFact
from trainer.process_group import DistContext, broadcast_object, gather_objects
from trainer.upload_progress import bar_label


def checkpoint_id_for(step: int, epoch: int, retry: int = 0) -> str:
    """Ids are never reused: the attempt's epoch tells attempts apart, ``retry`` a second try at a step."""
    return f"step{step:06d}-e{epoch}" + (f"-r{retry}" if retry else "")


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line; for DCP's aggregated error, each failing rank's own error."""
    if isinstance(err, CheckpointException):
        # Each failure is (exception, stack summary).
        causes = "; ".join(f"rank {r}: {type(e[0]).__name__}: {e[0]}" for r, e in sorted(err.failures.items()))
        text = f"write failed on {causes}"
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:400]


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
    shards_recorded: bool = False
    """Whether ``shard.written`` events name this checkpoint's files (if not, nothing refers to them)."""

    @property
    def fenced(self) -> bool:
        """A newer attempt took over the run: nothing more may be recorded."""
        return self.fenced_by is not None


class CommitProtocol:
    """Runs :func:`begin` and :func:`complete` of one checkpoint for this rank (see the module docstring)."""

    def __init__(self, ctx: DistContext, blobs: BlobStore, recorder: Recorder | None, *, stack: str,
                 topology: dict[str, int], retention: RetentionPolicy, codec: str = "none",
                 upload_bar: bool = False) -> None:
        self.ctx = ctx
        self.upload_bar = upload_bar and ctx.is_coordinator  # one bar per terminal: rank 0's file
        self.blobs = blobs
        self.recorder: Recorder = NullRecorder() if recorder is None else recorder  # None: this rank records nothing
        self.stack = stack
        self.topology = topology
        self.retention = retention
        self.codec = codec

    def begin(self, checkpoint_id: str, step: int, group: dist.ProcessGroup | None) -> SaveOutcome | None:
        """Phase 1: rank 0 appends ``checkpoint.started``; ``None`` to go on, or the fenced outcome for all."""
        fenced_by = None
        if not self.recorder.begin_checkpoint(checkpoint_id, step, self.ctx.world_size, self.stack, self.topology):
            fenced_by = self.recorder.fenced_by
        fenced_by = broadcast_object(fenced_by, group=group)
        if fenced_by is not None:  # a newer attempt owns the run: nobody writes
            return SaveOutcome(checkpoint_id, step, committed=False, reason="fenced", fenced_by=fenced_by)
        return None

    def complete(self, state: dict[str, Any], checkpoint_id: str, step: int, epoch: int, started: float,
                 group: dist.ProcessGroup | None,
                 after_begin: Callable[[], None] | None = None) -> tuple[SaveOutcome, int]:
        """Phases 2-3 (any thread; collective on ``group``): write, report, decide; ``(outcome, bytes written)``.

        If anything raises before rank 0 has recorded how the checkpoint ended, rank 0 records
        ``checkpoint.aborted`` with the error before it propagates: a started checkpoint always ends.
        ``after_begin`` runs (on rank 0) once ``checkpoint.started`` is recorded: the place for
        facts that name the checkpoint.
        """
        if after_begin is not None:
            after_begin()
        decided = False
        doing = "writing its shards"
        writer = LedgerStorageWriter(self.blobs, self.blobs.checkpoint_dir(checkpoint_id, epoch), self.codec,
                                     progress_label=bar_label(self.blobs, checkpoint_id) if self.upload_bar else None)
        try:
            report = self._write(state, writer, group)
            doing = "collecting shard reports"
            reports = gather_objects(report, group=group)
            outcome = None
            if reports is not None:  # rank 0, which alone receives the reports, decides
                doing = "committing"
                outcome = self._decide(self.recorder, checkpoint_id, step, reports, started)
            decided = True
            if outcome is not None and outcome.committed:
                crash_point("trainer.after_commit")
                self.recorder.apply_retention(self.retention)
            outcome = broadcast_object(outcome, group=group)
        except BaseException as err:
            if not decided:
                reason = (f"lost a rank while {doing}: {err}" if isinstance(err, RuntimeError)
                          else f"failed while {doing}: {one_line(err)}")
                self._abort_quietly(self.recorder, checkpoint_id, reason)
            raise
        if not outcome.shards_recorded:  # an abort or a fenced commit: nothing refers to these files
            self._remove(writer.written)
        return outcome, sum(s.bytes for s in writer.written)

    def _write(self, state: dict[str, Any], writer: LedgerStorageWriter,
               group: dist.ProcessGroup | None) -> RankReport:
        rank = self.ctx.rank
        try:
            dcp.save(state, storage_writer=writer, process_group=group)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - reported; the coordinator aborts with it
            # (DCP's CheckpointException derives from BaseException, so it is named explicitly.)
            self._remove(writer.written)  # the checkpoint will be aborted: remove what this rank wrote
            return RankReport(rank, (), one_line(err))
        crash_point("trainer.after_shard_write")
        crash_point(f"trainer.rank{rank}.after_shard_write")
        return RankReport(rank, tuple(writer.written))

    def _remove(self, shards: list[ShardFact]) -> None:
        for shard in shards:
            self.blobs.delete(shard.location)
        shards.clear()

    def _decide(self, recorder: Recorder, checkpoint_id: str, step: int, reports: list[RankReport],
                started: float) -> SaveOutcome:
        """Rank 0: commit when every rank wrote its files, abort with every failing rank's reason otherwise."""
        by_error: dict[str, list[int]] = {}
        for report in reports:
            if report.error is not None:  # DCP reports one rank's failure on every rank: group them
                by_error.setdefault(report.error, []).append(report.rank)
        if by_error:
            reason = "; ".join(f"reported by rank(s) {','.join(map(str, ranks))}: {error}"
                               for error, ranks in by_error.items())
            recorder.abort_checkpoint(checkpoint_id, reason)
            return SaveOutcome(checkpoint_id, step, committed=False, reason=reason, fenced_by=recorder.fenced_by)
        try:
            committed, recorded = recorder.record_and_commit(checkpoint_id, [s for r in reports for s in r.shards])
        except IncompleteCheckpointError as err:  # the shards were recorded: their files stay for gc to judge
            recorder.abort_checkpoint(checkpoint_id, str(err))
            return SaveOutcome(checkpoint_id, step, committed=False, reason=str(err), shards_recorded=True)
        if not committed:
            return SaveOutcome(checkpoint_id, step, committed=False, reason="fenced", fenced_by=recorder.fenced_by,
                               shards_recorded=recorded)
        durable_s = time.perf_counter() - started
        return SaveOutcome(checkpoint_id, step, committed=True, fenced_by=recorder.fenced_by, durable_s=durable_s,
                           shards_recorded=True)

    @staticmethod
    def _abort_quietly(recorder: Recorder, checkpoint_id: str, reason: str) -> None:
        """Record an abort on the way out of a failure; the original error matters more than this record."""
        try:
            recorder.abort_checkpoint(checkpoint_id, reason)
        except LedgerError as err:
            print(f"[ckpt-ledger] could not record the abort of {checkpoint_id}: {err}", file=sys.stderr, flush=True)
