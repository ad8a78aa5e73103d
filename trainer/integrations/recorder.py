"""Record a directory of files a framework wrote as one ledger checkpoint; find a verified resume target.

Frameworks (Lightning, the Hugging Face Trainer) write their own checkpoint files. The
ledger does not need to know their format: a checkpoint is the set of files the framework
wrote into a fresh, attempt-namespaced directory of the run's blob store, each one
fsynced, hashed (xxh3-128 through the blob store) and recorded as ``shard.written``
before ``checkpoint.committed``. Resume reads the projection's candidates, re-hashes
the chosen one's files and falls back (recording ``corruption.detected``) on a bad one —
no directory listing ever chooses what to resume or keep. Listing *our own fresh
directory* right after the framework returns is only how its file names are learnt.

This module is framework-independent; :mod:`trainer.integrations.lightning` and
:mod:`trainer.integrations.transformers` drive it from their callbacks.
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ledger import LEDGER_FILE, Attempt, CorruptBlobError, FencedError, Ledger, RetentionPolicy, View
from ledger.blobs import fsync_dir
from ledger.events import (
    AttemptEnded,
    CorruptionDetected,
    MetricRecorded,
    PreemptionSignalled,
    ShardWritten,
    StepCompleted,
)
from ledger.projection import CheckpointState
from ledger.statuses import AttemptStatus
from trainer.errors import EXIT_PREEMPTED
from trainer.identity import code_id, config_hash, ledger_version
from trainer.process_group import slurm_facts

#: ``step.completed`` events are buffered and appended in batches: at this many, after this many
#: seconds, and at every checkpoint — so work lost to a kill still shows in goodput, at one append a second.
STEP_BATCH = 50
STEP_FLUSH_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class ResumeTarget:
    """A committed checkpoint whose every file was just re-hashed and matched the ledger."""

    checkpoint_id: str
    step: int
    path: Path
    """The file or directory the framework loads (its ``entry`` inside the checkpoint directory)."""


def _entry_location(ckpt: CheckpointState, entry: str) -> str | None:
    """The recorded location of ``entry`` (a file, or a directory of files) inside ``ckpt``; ``None`` if absent."""
    for shard in ckpt.shards:
        head, sep, _ = shard.location.partition(f"/{entry}/")
        if sep:
            return f"{head}/{entry}"
        if shard.location.endswith(f"/{entry}") or shard.location == entry:
            return shard.location
    return None


def find_resume_target(run_dir: str | os.PathLike[str], *, entry: str) -> ResumeTarget | None:
    """The projection's resume target, verified; falls back past corrupt checkpoints. ``None``: nothing to resume.

    Every file of a candidate is re-hashed against its ``shard.written``; the first that
    does not match (or is missing) is recorded as ``corruption.detected`` — once, even when
    several processes of one job verify at the same time — and the next candidate is tried.
    Candidates without ``entry`` (written by another integration or the native trainer,
    which this framework cannot load) are passed over. A run without a ledger yet returns
    ``None`` without creating anything.
    """
    run_dir = Path(run_dir)
    if not (run_dir / LEDGER_FILE).is_file():
        return None
    with Ledger.open(run_dir) as led:
        for ckpt in led.projection().resume_candidates():
            location = _entry_location(ckpt, entry)
            if location is None:
                continue
            try:
                for shard in ckpt.shards:
                    led.blobs.verify(shard.location, shard.hash, shard.bytes)
            except CorruptBlobError as err:
                # The event id makes the report idempotent across the ranks of one job.
                led.append(CorruptionDetected(checkpoint_id=ckpt.checkpoint_id, location=err.location,
                                              expected_hash=err.expected_hash, found_hash=err.found_hash),
                           epoch=None, event_id=f"{ckpt.checkpoint_id}:corrupt:{err.location}")
                print(f"[ckpt-ledger] checkpoint {ckpt.checkpoint_id} (step {ckpt.step}) is corrupt ({err}); "
                      "falling back to the previous good one", file=sys.stderr, flush=True)
                continue
            return ResumeTarget(ckpt.checkpoint_id, ckpt.step, run_dir / location)
    return None


def checkpoint_holding(view: View, run_dir: Path, path: str | os.PathLike[str] | None) -> CheckpointState | None:
    """The recorded checkpoint that ``path`` (a file or directory inside the run dir) belongs to, if any."""
    if path is None:
        return None
    try:
        rel = Path(os.path.relpath(Path(path).resolve(), run_dir.resolve())).as_posix()
    except ValueError:  # another drive (Windows): not ours
        return None
    for ckpt in reversed(list(view.checkpoints.values())):
        if any(s.location == rel or s.location.startswith(rel + "/") for s in ckpt.shards):
            return ckpt
    return None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointRecorder:
    """One attempt's record of a framework's run: steps, checkpoints (as directories of files), metrics, retention.

    Only one process per job (global rank 0) owns a recorder that writes; the framework
    makes every rank finish writing before the recorder commits.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, integration: str, policy: RetentionPolicy,
                 best_metric: str | None = None, best_mode: str = "min",
                 settings: Mapping[str, Any] | None = None) -> None:
        if best_mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {best_mode!r}")
        self.run_dir = Path(run_dir)
        self.integration = integration
        self.policy = policy
        # Recorded in run.started: `ckpt-ledger gc` and the projection's best rule read these keys.
        self.config: dict[str, Any] = {
            "integration": integration, "keep_last": policy.keep_last, "keep_every": policy.keep_every,
            "keep_best": policy.keep_best, **dict(settings or {}),
        }
        if best_metric:
            self.config.update(best_metric=best_metric, best_mode=best_mode)
        self.ledger: Ledger | None = None
        self.attempt: Attempt | None = None
        self.ended: str | None = None
        """How the attempt ended (``completed``, ``preempted``, ``failed``), once it has."""
        self.saved_steps: dict[int, str] = {}
        """Checkpoint id of each step this attempt committed."""
        self._steps: list[StepCompleted] = []
        self._flushed_at = time.monotonic()

    # -- the attempt -------------------------------------------------------------------------

    def begin_attempt(self, *, world_size: int, stack: str, resumed_from_path: str | os.PathLike[str] | None) -> int:
        """Open the ledger, record the run (once) and begin this attempt; returns its fencing epoch.

        ``resumed_from_path`` is what the framework was told to load; when it lies in a recorded
        checkpoint, that checkpoint becomes the attempt's ``resumed_from`` (requeue lineage, goodput).
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger.open(self.run_dir)
        entry_script = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else Path.cwd()
        self.ledger.start_run(run_id=uuid.uuid4().hex[:12], config=self.config, config_hash=config_hash(self.config),
                              code_id=code_id(entry_script), ledger_version=ledger_version())
        resumed = checkpoint_holding(self.ledger.projection(), self.run_dir, resumed_from_path)
        elastic_id = os.environ.get("TORCHELASTIC_RUN_ID")  # torchrun's default is the word "none"
        job_id = os.environ.get("SLURM_JOB_ID") or (elastic_id if elastic_id != "none" else None) or None
        self.attempt = self.ledger.begin_attempt(
            job_id=job_id, slurm=slurm_facts(os.environ), world_size=world_size, stack=stack,
            topology={"dp": world_size}, resumed_from=resumed.checkpoint_id if resumed else None,
        )
        return self.attempt.epoch

    @property
    def epoch(self) -> int:
        """This attempt's fencing epoch."""
        if self.attempt is None:
            raise RuntimeError("the attempt has not begun")
        return self.attempt.epoch

    @property
    def recording(self) -> bool:
        """The attempt has begun here (rank 0) and not ended: facts may still be recorded."""
        return self.attempt is not None and self.ended is None

    def _led(self) -> Ledger:
        if self.ledger is None:
            raise RuntimeError("the attempt has not begun")
        return self.ledger

    def end_attempt(self, reason: str, last_step: int, *, signal_name: str | None = None) -> None:
        """Record how the attempt ended (once; later calls are ignored)."""
        if not self.recording:
            return
        self.flush_steps()
        events: list[Any] = []
        if signal_name is not None:
            events.append(PreemptionSignalled(signal=signal_name, step=last_step))
        events.append(AttemptEnded(epoch=self.epoch, reason=reason, last_step=last_step))
        self._led().append_many(events, epoch=self.epoch)
        self.ended = reason

    @property
    def exit_code(self) -> int:
        """0, or 75 (EX_TEMPFAIL: "requeue me") when the attempt ended preempted after saving."""
        return EXIT_PREEMPTED if self.ended == AttemptStatus.PREEMPTED else 0

    def close(self) -> None:
        """Flush buffered steps and release the ledger."""
        if self.ledger is not None:
            try:
                if self.ended is None:
                    self.flush_steps()
            except FencedError:
                pass  # a newer attempt owns the run: these steps must not be recorded
            finally:
                self.ledger.close()
                self.ledger = None

    # -- steps and metrics ---------------------------------------------------------------------

    def step_completed(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Buffer a ``step.completed`` (appended in batches; non-finite values are left out)."""
        finite = {k: float(v) for k, v in (metrics or {}).items() if math.isfinite(v)}
        if self._steps and self._steps[-1].step == step:  # more metrics of a step already buffered
            finite = {**self._steps[-1].metrics, **finite}
            self._steps.pop()
        self._steps.append(StepCompleted(step=step, metrics=finite))
        if len(self._steps) >= STEP_BATCH or time.monotonic() - self._flushed_at >= STEP_FLUSH_SECONDS:
            self.flush_steps()

    def flush_steps(self) -> None:
        """Append the buffered steps in one transaction."""
        self._flushed_at = time.monotonic()
        if self._steps:
            batch, self._steps = self._steps, []
            self._led().append_many(batch, epoch=self.epoch)

    def record_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record measured metrics (e.g. ``val_loss``) as ``metric.recorded``, tied to the checkpoint of ``step``.

        A metric that arrives after its checkpoint was committed still ranks it for ``best``.
        Non-finite values are not recorded: they could never rank.
        """
        checkpoint_id = self.saved_steps.get(step)
        events = [MetricRecorded(name=name, value=float(value), step=step, checkpoint_id=checkpoint_id)
                  for name, value in metrics.items() if math.isfinite(value)]
        if events:
            self.flush_steps()
            self._led().append_many(events, epoch=self.epoch)
            # A late metric can move ``best``: the checkpoint that was best until now may no longer be kept.
            self.apply_retention()

    # -- checkpoints ---------------------------------------------------------------------------

    def checkpoint_id_for(self, step: int) -> str:
        """The id of this attempt's checkpoint at ``step`` (unique across attempts: it names the epoch)."""
        return f"step{step:06d}-e{self.epoch}"

    def checkpoint_dir(self, checkpoint_id: str) -> Path:
        """The fresh, attempt-namespaced directory the framework writes ``checkpoint_id`` into."""
        return self.run_dir / self._led().blobs.checkpoint_dir(checkpoint_id, self.epoch)

    def begin_checkpoint(self, step: int, *, world_size: int, stack: str) -> str:
        """Record ``checkpoint.started`` (before the framework writes anything); returns the id."""
        checkpoint_id = self.checkpoint_id_for(step)
        self.flush_steps()
        # One recorder (rank 0) records every file once all ranks have written: the expected writer is rank 0.
        self._led().begin_checkpoint(checkpoint_id=checkpoint_id, step=step, ranks=[0], world_size=world_size,
                                     stack=stack, topology={"dp": world_size}, epoch=self.epoch)
        return checkpoint_id

    def commit_directory(self, checkpoint_id: str, step: int) -> list[ShardWritten]:
        """Make every file the framework wrote durable, record each (size, xxh3), commit, then apply retention.

        Refused (the checkpoint is aborted and :class:`ValueError` raised) if the framework
        wrote nothing there.
        """
        led = self._led()
        root = self.checkpoint_dir(checkpoint_id)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        if not files:
            led.abort_checkpoint(checkpoint_id, "the framework wrote no files", epoch=self.epoch)
            raise ValueError(f"checkpoint {checkpoint_id}: the framework wrote no files into {root}")
        # Durable first: file contents, then every directory entry up to the blob root.
        for path in files:
            _fsync_file(path)
        dirs = {self.run_dir}
        for path in files:
            directory = path.parent
            while directory != self.run_dir and self.run_dir in directory.parents:
                dirs.add(directory)
                directory = directory.parent
        for directory in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
            fsync_dir(directory)
        shards = []
        for path in files:
            location = path.relative_to(self.run_dir).as_posix()
            digest, size = led.blobs.hash_file(location)
            shards.append(ShardWritten(checkpoint_id=checkpoint_id, rank=0, location=location, bytes=size, hash=digest))
        led.record_shards(checkpoint_id, shards, epoch=self.epoch)
        led.commit_checkpoint(checkpoint_id, epoch=self.epoch)
        self.saved_steps[step] = checkpoint_id
        self.apply_retention()
        return shards

    def apply_retention(self) -> None:
        """Delete what the policy no longer keeps, through the ledger (requested → files removed → deleted)."""
        if self.policy.active:
            self._led().apply_retention(self.policy, epoch=self.epoch)

    def abort_checkpoint(self, checkpoint_id: str, reason: str) -> None:
        """Record that a begun checkpoint will never be committed (the framework's save failed)."""
        self._led().abort_checkpoint(checkpoint_id, reason[:500], epoch=self.epoch)
