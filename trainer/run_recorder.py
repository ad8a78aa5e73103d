"""``RunRecorder``: rank 0's record of the run, through the ledger's Python API only.

Facts are born on every rank but recorded by one writer: the recorder owns the
``Ledger`` handle and the attempt's fencing epoch, buffers ``step.completed`` events
into batched appends, and turns the first ``FencedError`` into a remembered state the
training loop acts on at the next step boundary (a fenced writer must stop, and must
not try to record anything else).

The recorder is shared by the training thread (steps, metrics, the attempt) and the
background checkpoint writer (shard records, commit, retention): one re-entrant lock
serialises every use of the ledger handle, so each append is one whole transaction
and the step buffer is never flushed twice.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from ledger import Attempt, BlobStore, FencedError, Ledger, LedgerError, RetentionPolicy, View
from ledger.events import (
    AttemptEnded,
    PreemptionSignalled,
    ShardWritten,
    StepCompleted,
)
from ledger.faults import crash_point
from ledger.garbage import retention_pass
from ledger.statuses import AttemptStatus
from trainer.store_housekeeping import OlderEpochSweep, store_failures_as_warnings


@dataclass(frozen=True, slots=True)
class ShardFact:
    """One file a rank wrote for a checkpoint: what ``shard.written`` records."""

    rank: int
    location: str
    bytes: int
    hash: str
    codec: str = "none"


class Fenced(Exception):
    """A newer attempt owns the run; this one must stop without recording anything more."""

    def __init__(self, fenced_by: int) -> None:
        super().__init__(f"fenced by epoch {fenced_by}: a newer attempt took over this run; not restarting")
        self.fenced_by = fenced_by


class RunRecorder:
    """The coordinator's writer: run identity, the attempt, steps, checkpoints, metrics, retention."""

    def __init__(self, run_dir: str) -> None:
        self.ledger = Ledger.open(run_dir)
        self.attempt: Attempt | None = None
        self.fenced_by: int | None = None
        self._steps: list[StepCompleted] = []
        self._last_step: int | None = None
        self._lock = threading.RLock()
        self._sweep: OlderEpochSweep | None = None  # older epochs' strays, swept once per attempt

    # -- the run and the attempt -----------------------------------------------------------

    def start_run(self, config: dict[str, Any], config_hash: str, code_id: str | None,
                  *, blobs: str | None = None, ledger_version: str | None = None) -> tuple[str, bool]:
        """Record the run's identity (once); returns ``(run_id, same_config)``."""
        started = self.ledger.start_run(run_id=uuid.uuid4().hex[:12], config=config, config_hash=config_hash,
                                        code_id=code_id, blobs=blobs, ledger_version=ledger_version)
        return started.run_id, started.config_hash == config_hash

    @property
    def blobs(self) -> "BlobStore":
        """The run's blob store, as ``run.started`` recorded it."""
        return self.ledger.blobs

    def projection(self) -> View:
        """The run as the ledger sees it now."""
        with self._lock:
            return self.ledger.projection()

    def begin_attempt(self, *, world_size: int, stack: str, topology: dict[str, int], resumed_from: str | None,
                      slurm: dict[str, Any] | None, previous_topology: dict[str, Any] | None) -> int:
        """Begin this attempt (fencing every older one); returns its epoch."""
        job_id = (slurm or {}).get("job_id") or os.environ.get("TORCHELASTIC_RUN_ID") or None
        self.attempt = self.ledger.begin_attempt(
            job_id=job_id, slurm=slurm, host=socket.gethostname(), pid=os.getpid(), world_size=world_size,
            stack=stack, topology=topology, resumed_from=resumed_from, previous_topology=previous_topology,
        )
        self._sweep = OlderEpochSweep.start(self.ledger, self.projection, self.attempt.epoch)
        return self.attempt.epoch

    @property
    def epoch(self) -> int:
        """This attempt's fencing epoch."""
        if self.attempt is None:
            raise RuntimeError("no attempt has begun")
        return self.attempt.epoch

    def report_corruption(self, checkpoint_id: str, location: str, expected: str | None, found: str | None) -> None:
        """Record a shard that failed verification (before an attempt began: as an operator fact)."""
        epoch = self.attempt.epoch if self.attempt is not None else None
        self._guard(lambda: self.ledger.report_corruption(checkpoint_id, location, expected, found, epoch=epoch))

    def end_attempt(self, reason: str, last_step: int, *, signal_name: str | None = None) -> None:
        """Flush steps and record how the attempt ended (nothing is recorded once fenced)."""
        if self.fenced_by is not None or self.attempt is None:
            return
        self.flush_steps()
        events: list[Any] = []
        if signal_name is not None:
            events.append(PreemptionSignalled(signal=signal_name, step=last_step))
        events.append(AttemptEnded(epoch=self.epoch, reason=reason, last_step=last_step))
        self._guard(lambda: self.ledger.append_many(events, epoch=self.epoch))

    # -- steps and metrics -------------------------------------------------------------------

    def step_completed(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer one ``step.completed`` (appended by :meth:`flush_steps`).

        Non-finite values (a diverged loss) cannot be stored as JSON numbers; they are left
        out of the event, with a warning, rather than failing the attempt that hit them.
        """
        finite = {name: value for name, value in metrics.items() if math.isfinite(value)}
        if len(finite) != len(metrics):
            self._warn_nonfinite(step, {n: v for n, v in metrics.items() if n not in finite})
        with self._lock:
            self._steps.append(StepCompleted(step=step, metrics=finite))
            self._last_step = step

    def flush_steps(self) -> None:
        """Append the buffered steps in one transaction."""
        with self._lock:
            if not self._steps or self.fenced_by is not None:
                return
            batch, self._steps = self._steps, []
            self._guard(lambda: self.ledger.append_many(batch, epoch=self.epoch))

    def metric(self, name: str, value: float, step: int, checkpoint_id: str | None) -> None:
        """Record a metric (e.g. ``eval_loss``), tied to a checkpoint when one was taken at ``step``.

        A non-finite value is not recorded (with a warning): it could never rank as ``best``.
        """
        if not math.isfinite(value):
            self._warn_nonfinite(step, {name: value})
            return
        self._guard(lambda: self.ledger.record_metric(name, value, step, checkpoint_id, epoch=self.epoch))

    # -- the two-phase checkpoint ------------------------------------------------------------

    def checkpoint_dir(self, checkpoint_id: str) -> str:
        """The attempt-namespaced location prefix the ranks write ``checkpoint_id`` into."""
        return self.ledger.blobs.checkpoint_dir(checkpoint_id, self.epoch)

    def begin_checkpoint(self, checkpoint_id: str, step: int, world_size: int, stack: str,
                         topology: dict[str, int]) -> bool:
        """Phase 1; ``False`` when fenced (then nobody may write)."""
        self.flush_steps()
        return self._guard(lambda: self.ledger.begin_checkpoint(
            checkpoint_id=checkpoint_id, step=step, ranks=list(range(world_size)), world_size=world_size,
            stack=stack, topology=topology, epoch=self.epoch)) is not None

    def commit_checkpoint(self, checkpoint_id: str, shards: Sequence[ShardFact]) -> bool:
        """Record every shard, then commit; ``False`` when fenced. Refusals (a missing rank) raise."""
        return self.record_and_commit(checkpoint_id, shards)[0]

    def record_and_commit(self, checkpoint_id: str, shards: Sequence[ShardFact]) -> tuple[bool, bool]:
        """:meth:`commit_checkpoint`, also saying whether the ``shard.written`` records were appended.

        ``(committed, shards_recorded)``: a fenced writer whose shards were not recorded owns
        files nothing refers to, and removes them.
        """
        events = [ShardWritten(checkpoint_id=checkpoint_id, rank=s.rank, location=s.location, bytes=s.bytes,
                               hash=s.hash, codec=s.codec) for s in shards]
        if self._guard(lambda: self.ledger.record_shards(checkpoint_id, events, epoch=self.epoch)) is None:
            return False, False
        crash_point("trainer.before_commit")
        return self._guard(lambda: self.ledger.commit_checkpoint(checkpoint_id, epoch=self.epoch)) is not None, True

    def abort_checkpoint(self, checkpoint_id: str, reason: str) -> None:
        """Record that the checkpoint will never be committed, and why."""
        self._guard(lambda: self.ledger.abort_checkpoint(checkpoint_id, reason[:500], epoch=self.epoch))

    def apply_retention(self, policy: RetentionPolicy) -> list[str]:
        """Run the retention pass after a commit; returns the deleted checkpoint ids.

        Besides the policy, it deletes torn and aborted saves (older attempts' stray files are swept
        once per attempt, off the commit path: :mod:`trainer.store_housekeeping`). A store failure
        is a warning: the commit stands and the next pass finishes the requested deletions.
        """
        done = None
        with store_failures_as_warnings("retention after a commit", "the commit stands; the next pass retries"):
            done = self._guard(lambda: retention_pass(self.ledger, policy, epoch=self.epoch, sweep_strays=False))
        return [d.checkpoint_id for d in done.deletions] if done is not None else []

    def close(self) -> None:
        """Wait (bounded) for the older-epoch sweep, then release the ledger."""
        if self._sweep is not None:
            self._sweep.finish()
        with self._lock:
            self.ledger.close()

    def _warn_nonfinite(self, step: int, dropped: dict[str, float]) -> None:
        names = ", ".join(f"{name}={value}" for name, value in dropped.items())
        print(f"[ckpt-ledger] warning: step {step}: {names} is not finite and is not recorded", file=sys.stderr,
              flush=True)

    # -- fencing -------------------------------------------------------------------------------

    def _guard(self, append):  # noqa: ANN001, ANN202 - a thunk returning whatever the append returns
        """Run an append; on ``FencedError`` remember who fenced us and return ``None``."""
        with self._lock:
            if self.fenced_by is not None:
                return None
            try:
                return append()
            except FencedError as err:
                self.fenced_by = err.fenced_by
                self._record_fenced(err.fenced_by)
                return None

    def _record_fenced(self, fenced_by: int) -> None:
        """Record ``attempt.ended(fenced)`` as an operator write (this epoch's own appends are refused now),
        so inspect, audit and timeline show the attempt as fenced rather than crashed."""
        if self.attempt is None:
            return
        event = AttemptEnded(epoch=self.attempt.epoch, reason=AttemptStatus.FENCED, last_step=self._last_step,
                             fenced_by=fenced_by)
        try:
            self.ledger.append(event, epoch=None, event_id=f"attempt.ended:e{self.attempt.epoch}:fenced")
        except LedgerError as err:  # the job stops either way; the log then shows it as crashed
            print(f"[ckpt-ledger] could not record that attempt {self.attempt.epoch} was fenced: {err}",
                  file=sys.stderr, flush=True)
