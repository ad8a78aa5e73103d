"""``CheckpointManager``: the ledger's checkpointing for any training loop.

>>> from trainer import CheckpointManager
>>> state = {"model": model, "optim": optimizer, "sched": scheduler, "data": loader}  # doctest: +SKIP
>>> with CheckpointManager(run_dir, save_every=500, keep_last=3) as ckpt:            # doctest: +SKIP
...     start = ckpt.restore(state)              # 0 when fresh, else the resumed step
...     for step in range(start + 1, total + 1):
...         loss = train_one_step()
...         ckpt.log(step, loss=float(loss))
...         if ckpt.should_save(step) or step == total:
...             ckpt.save(step, state, block=(step == total))
...         if ckpt.should_stop(step):           # collective: SIGTERM/SIGUSR1 or fenced, on any rank
...             ckpt.save(step, state, block=True)
...             break
>>> sys.exit(ckpt.exit_code)                     # doctest: +SKIP

It works in any ``torch.distributed`` job whose process group the loop initialized
(DDP, FSDP2, tensor parallel), or in a single process with none (it then runs a
one-process gloo group of its own for the duration). Everything the Trainer
guarantees holds: fenced attempts, a commit only after every rank's shards are
durable and hashed, hash verification before a load (``corruption.detected`` and the
previous good checkpoint), background saves through reused staging buffers,
retention through the ledger, preemption signals turned into one collective decision,
and ``attempt.ended`` with the right reason however the ``with`` block is left.

Collective calls (every rank, same order): the constructor, :meth:`restore`,
:meth:`save`, :meth:`should_stop`, :meth:`close`, and :meth:`should_save` when
``save_every_seconds`` is set.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any, Mapping

import torch.distributed as dist

from ledger import BlobStore, LedgerError, View
from ledger.blobs import blob_store_for
from ledger.statuses import AttemptStatus
from trainer.attempt_start import (
    begin_attempt,
    detect_stack,
    load_start,
    policy_config,
    record_run_started,
    recorded_blobs,
    report_corruption,
)
from trainer.checkpoint_outcomes import (
    AttemptEnding,
    SaveResult,
    SaveStatus,
    Stop,
    attempt_ending,
    fenced_ending,
    fenced_result,
)
from trainer.checkpoint_settings import CheckpointSettings, check_metrics, check_step
from trainer.checkpoint_state import (  # noqa: F401 - unmappable_checkpoint_message is re-exported
    DCPStateDicts,
    StateDictIO,
    TrainingState,
    unmappable_checkpoint_message,
)
from trainer.checkpointing import BackgroundCheckpointError, Checkpointer, SaveOutcome
from trainer.errors import EXIT_PROBLEM, BadInputError, StartRefusedError
from trainer.preemption import PreemptionWatch
from trainer.process_group import DistContext, all_reduce_max, broadcast_object, join_current_or_single
from trainer.recorder import NullRecorder, Recorder
from trainer.run_recorder import RunRecorder
from trainer.sources import choose_start, honoured_resume

#: A save whose checkpoint holds (or will hold) the state: metrics may name it.
_TAKEN = (SaveStatus.COMMITTED, SaveStatus.IN_FLIGHT)


class CheckpointManager:
    """Checkpoints of one attempt of a run in ``run_dir``, for the caller's own training loop.

    ``save_every``: :meth:`should_save` is true every N steps; ``save_every_seconds``:
    also once that many seconds passed since the last save (decided on rank 0, the
    same step on every rank). Retention (``keep_*``, ``keep_best`` by ``best_metric``/
    ``best_mode``; ``keep_every_seconds``/``keep_for`` by commit time, as seconds or ``"6h"``)
    runs through the ledger after each commit. ``async_save``: a save
    without ``block=True`` is written in the background. ``resume`` (an id, ``latest``
    or ``best``) > automatic resume > ``pretrained`` (a torch state-dict file of the
    single model in ``state``) > fresh. ``config`` describes the experiment in
    ``run.started``. ``stack``/``topology`` label the layout in the ledger (detected
    when omitted); ``state_io`` moves (model, optimizer) pairs in and out of
    checkpoint form (default: DCP's ``get_state_dict``/``set_state_dict``).
    """

    def __init__(self, run_dir: str, *, save_every: int | None = None, save_every_seconds: float | None = None,
                 keep_last: int | None = None, keep_every: int | None = None, keep_best: int | None = None,
                 keep_every_seconds: float | str | None = None, keep_for: float | str | None = None,
                 keep_without_metric: bool = False, best_metric: str = "eval_loss", best_mode: str = "min",
                 async_save: bool = True, codec: str = "none", blobs: str | None = None, resume: str | None = None,
                 pretrained: str | None = None, config: Mapping[str, Any] | None = None, log_every: int = 10,
                 stack: str | None = None, topology: Mapping[str, int] | None = None,
                 state_io: StateDictIO | None = None, dist_timeout_s: float = 1800.0,
                 preemption: PreemptionWatch | None = None, verbose: bool = True) -> None:
        # Every argument is checked before anything is created or joined: bad input changes nothing.
        settings = CheckpointSettings.checked(
            run_dir, save_every=save_every, save_every_seconds=save_every_seconds, keep_last=keep_last,
            keep_every=keep_every, keep_best=keep_best, keep_every_seconds=keep_every_seconds, keep_for=keep_for,
            keep_without_metric=keep_without_metric, best_metric=best_metric, best_mode=best_mode,
            async_save=async_save, codec=codec, blobs=blobs, resume=resume, pretrained=pretrained, config=config,
            log_every=log_every, stack=stack, topology=topology)
        self.retention = settings.retention
        self.blobs = settings.blobs
        self.run_dir = settings.run_dir
        self.save_every, self.save_every_seconds = settings.save_every, settings.save_every_seconds
        self.best_metric, self.best_mode = settings.best_metric, settings.best_mode
        self.async_save, self.codec = settings.async_save, settings.codec
        self.resume, self.pretrained = settings.resume, settings.pretrained
        self.config = settings.config
        self.log_every = settings.log_every
        self.stack, self.topology = settings.stack, settings.topology
        self.state_io: StateDictIO = state_io or DCPStateDicts()
        self.verbose = verbose

        self.exit_code = 0
        """0; 75 (``EX_TEMPFAIL``) when preempted (its state saved: requeue me); 1 when fenced or failed.
        Final once the manager is closed."""
        self.message: str | None = None
        """One line for the user when the attempt did not complete."""
        self.status: str = AttemptStatus.RUNNING
        """How the attempt ended once closed: ``completed``, ``preempted``, ``fenced`` or ``failed``."""
        self.recorder: Recorder = NullRecorder()
        """Rank 0's :class:`RunRecorder` from :meth:`restore` until closed; a :class:`NullRecorder` otherwise."""
        self.checkpointer: Checkpointer | None = None
        self.epoch: int | None = None
        self.restored_from: str | None = None
        self._restored_step: int | None = None
        self._last_logged = 0
        self._last_save: SaveResult | None = None
        self._last_save_time = time.monotonic()
        self._stop: Stop | None = None
        self._background_error: BackgroundCheckpointError | None = None
        self._closed = False
        self._timings: list = []

        # Join the loop's process group (or run a one-process one), then catch preemption signals.
        try:
            self.ctx: DistContext = join_current_or_single(dist_timeout_s)
        except RuntimeError as err:
            raise BadInputError(str(err)) from None
        self._owns_watch = preemption is None
        self.preemption = preemption or PreemptionWatch().install()

    # -- start ---------------------------------------------------------------------------------

    def restore(self, state: Mapping[str, Any]) -> int:
        """Load what the run should continue from into ``state``; returns its step (0 when fresh). Collective.

        Begins the attempt (fencing older ones). ``resume=`` must exist and verify; otherwise
        the newest verified checkpoint is loaded, a corrupt one reported and skipped.
        """
        if self._closed:
            raise BadInputError("restore() on a closed CheckpointManager; make a new one")
        if self._restored_step is not None:
            raise BadInputError(f"restore() was already called (the attempt started at step {self._restored_step}); "
                                "call it once, before the loop")
        entries = TrainingState.of(state)
        if self.pretrained is not None:
            entries.only_module("pretrained=")
        stack = self.stack or detect_stack(entries)
        topology = self.topology or {"tp": 1, "pp": 1, "dp": self.ctx.world_size}
        self.stack, self.topology = stack, topology

        view: View | None = None
        store: BlobStore | None = None
        where: tuple[str | None, str | None] | None = None
        failure: LedgerError | ValueError | OSError | None = None
        if self.ctx.is_coordinator:  # rank 0 alone opens the ledger and records the run once
            try:
                writer = self._open_recorder()
                view, where, store = writer.projection(), recorded_blobs(writer, self.blobs), writer.blobs
            except (LedgerError, ValueError, OSError) as err:
                failure = err
        # Every rank learns whether rank 0 could read the ledger (rather than waiting in the next
        # collective) and which blob store the run uses: each rank writes its own shards there.
        problem, (blobs_url, error) = broadcast_object(
            (None if failure is None else str(failure).splitlines()[0], where or (None, None)))
        if failure is not None:
            raise failure
        if problem is not None:
            raise StartRefusedError(f"rank 0 could not open the run's ledger: {problem}")
        if error is not None:
            raise BadInputError(error)
        if store is None:  # every other rank reaches the store through the URL rank 0 read
            store = blob_store_for(blobs_url, self.run_dir)
        self.checkpointer = Checkpointer(self.ctx, store, self.recorder, stack=stack, topology=topology,
                                         retention=self.retention, background=self.async_save, codec=self.codec,
                                         upload_bar=self.verbose)
        self._timings = self.checkpointer.timings
        plan = choose_start(self.checkpointer, view, resume=honoured_resume(self.resume), pretrained=self.pretrained)
        if plan.error is not None:
            report_corruption(self.recorder, plan, self._say)
            raise StartRefusedError(plan.error)
        try:
            step = load_start(plan, entries, self.checkpointer, self.state_io, ctx=self.ctx, stack=stack,
                              topology=topology, say=self._say)
        except BaseException:
            report_corruption(self.recorder, plan, self._say)
            raise
        self.epoch = begin_attempt(self.recorder, plan, ctx=self.ctx, stack=stack, topology=topology, say=self._say)
        self._restored_step = self._last_logged = step
        self.restored_from = plan.candidate.checkpoint_id if plan.candidate is not None else None
        self._last_save_time = time.monotonic()
        return step

    def _open_recorder(self) -> RunRecorder:
        """Rank 0: open the ledger (the manager's recorder from now on) and record ``run.started`` (once per run)."""
        self.recorder = writer = RunRecorder(self.run_dir)  # set first: closing the manager closes it
        record_run_started(writer, run_dir=self.run_dir, blobs=self.blobs, say=self._say,
                           config={**self.config, **policy_config(self.retention, self.best_metric, self.best_mode)})
        return writer

    # -- the loop --------------------------------------------------------------------------------

    def log(self, step: int, **metrics: float) -> None:
        """Record ``step.completed`` with ``metrics`` (rank 0's values; appended in batches of ``log_every``)."""
        self._require_started("log")
        check_step("log", step, floor=self._last_logged)
        values = check_metrics(metrics)
        self._last_logged = step
        self.recorder.step_completed(step, values)
        if step % self.log_every == 0:
            self.recorder.flush_steps()
        self._collect(block=False)

    def record_metrics(self, step: int, **metrics: float) -> None:
        """Record evaluation metrics (``metric.recorded``) at ``step`` (rank 0's values).

        They count for ``best`` through the checkpoint saved at ``step``, if any (also one still
        being written); :meth:`save`'s ``metrics=`` is the same for the checkpoint it takes.
        """
        self._require_started("record_metrics")
        values = check_metrics(metrics)
        last = self._last_save
        checkpoint_id = last.checkpoint_id if last is not None and last.step == step and last.status in _TAKEN else None
        for name, value in values.items():  # after checkpoint.started, even while it is being written
            self.checkpointer.record_metric(name, value, step=step, checkpoint_id=checkpoint_id)

    @property
    def committed_step(self) -> int | None:
        """The newest step known committed: saved by this attempt, else restored (``None``: neither)."""
        last = self._last_save
        if last is not None and last.status == SaveStatus.COMMITTED:
            return last.step
        return self._restored_step if self.restored_from is not None else None

    @property
    def last_saved(self) -> SaveResult | None:
        """The newest checkpoint this attempt took, as last known (``None``: none yet)."""
        return self._last_save

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is due for a checkpoint (every ``save_every`` steps, or ``save_every_seconds``).

        Collective when ``save_every_seconds`` is set: rank 0's clock decides for every rank.
        """
        due = bool(self.save_every) and step % self.save_every == 0
        if self.save_every_seconds is not None:
            elapsed = time.monotonic() - self._last_save_time >= self.save_every_seconds
            [vote] = all_reduce_max([int(elapsed and self.ctx.is_coordinator)], self.ctx.device)
            due = due or bool(vote)
        return due

    def save(self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, float] | None = None,
             block: bool = False) -> SaveResult:
        """Checkpoint ``state`` as ``step`` (collective); ``metrics`` are recorded against it (rank 0's values).

        ``block=False`` (and ``async_save``): returns once the state is snapshotted; the
        checkpoint commits in the background. ``block=True``: returns once it is committed.
        Saving the step just saved again does nothing (``block=True`` waits for it).
        """
        self._require_started("save")
        entries = TrainingState.of(state)
        values = check_metrics(dict(metrics or {}))
        last = self._last_save
        if last is not None and last.step == step and last.status in _TAKEN:
            if block:
                self._collect(block=True)
            return self._last_save
        check_step("save", step, floor=max(self._restored_step or 0, last.step if last else 0))
        if step == self._restored_step and self.restored_from is not None:
            raise BadInputError(f"save(step={step}): step {step} is already committed as checkpoint "
                                f"{self.restored_from} (restored from it); save a later step")
        if self._stop is not None and self._stop[0] == AttemptStatus.FENCED:
            return fenced_result(step, self._stop[1])

        started = time.perf_counter()  # the stall recorded in the timings starts here
        self._collect(block=True)  # at most one checkpoint in flight: its staging buffers are reused
        payload = entries.pack(self.state_io, step=step, rank=self.ctx.rank)
        if block or not self.async_save:
            outcome = self.checkpointer.save(payload, step=step, epoch=self.epoch, started=started)
        else:
            outcome = self.checkpointer.save_async(payload, step=step, epoch=self.epoch, started=started)
        self._last_save_time = time.monotonic()
        if outcome is None:
            result = SaveResult(self.checkpointer.in_flight, step, SaveStatus.IN_FLIGHT)
            self._last_save = result
        else:
            result = self._take(outcome)
        if result.status in _TAKEN:
            for name, value in values.items():  # after checkpoint.started, even while it is being written
                self.checkpointer.record_metric(name, value, step=step, checkpoint_id=result.checkpoint_id)
        return result

    def should_stop(self, step: int) -> bool:
        """Whether every rank stops after ``step``: a preemption signal or fencing on any rank. Collective.

        A background writer's failure on any rank is raised here, on every rank.
        """
        self._require_started("should_stop")
        self._collect(block=False)
        received = self.preemption.received
        signum = int(signal.Signals[received]) if received is not None else 0
        fenced_by = self.recorder.fenced_by or 0  # rank 0's knowledge reaches every rank through the reduction
        failed = int(self._background_error is not None)
        signum, fenced_by, failed = all_reduce_max([signum, fenced_by, failed], self.ctx.device)
        if failed:  # every rank stops at this boundary, the one whose writer failed says why
            raise self._background_error or BackgroundCheckpointError(
                "a peer's background checkpoint writer failed (its error is in that rank's output)")
        if fenced_by:
            self._stop = (AttemptStatus.FENCED, fenced_by)
        elif signum and self._stop is None:
            self._stop = (AttemptStatus.PREEMPTED, signum)
        return self._stop is not None

    @property
    def timings(self) -> list:
        """What each checkpoint cost this rank (:class:`trainer.checkpointing.CheckpointTiming`)."""
        return self._timings

    # -- outcomes --------------------------------------------------------------------------------

    def _take(self, outcome: SaveOutcome) -> SaveResult:
        """Learn how a checkpoint ended (rank 0 decided; every rank has the same outcome)."""
        if outcome.committed:
            result = SaveResult(outcome.checkpoint_id, outcome.step, SaveStatus.COMMITTED)
            self._say(f"checkpoint {outcome.checkpoint_id} committed at step {outcome.step}")
        elif outcome.fenced:
            self._stop = (AttemptStatus.FENCED, outcome.fenced_by)
            result = fenced_result(outcome.step, outcome.fenced_by, outcome.checkpoint_id)
        else:
            result = SaveResult(outcome.checkpoint_id, outcome.step, SaveStatus.ABORTED, outcome.reason)
            self._say(f"checkpoint {outcome.checkpoint_id} aborted: {outcome.reason}", error=True)
        if self._last_save is None or self._last_save.checkpoint_id == outcome.checkpoint_id \
                or self._last_save.step <= outcome.step:
            self._last_save = result
        return result

    def _collect(self, *, block: bool) -> None:
        """Take a background save's outcome if it ended (``block``: wait for it).

        A writer failure seen without blocking is kept for :meth:`should_stop` so that every
        rank stops at the same step; when blocking (before another save, at the end) it is raised.
        """
        if self.checkpointer is None:
            return
        if self._background_error is not None:
            if block:
                raise self._background_error
            return
        try:
            outcome = self.checkpointer.wait() if block else self.checkpointer.poll()
        except BackgroundCheckpointError as err:
            self._background_error = err
            if block:
                raise
            return
        if outcome is not None:
            self._take(outcome)

    # -- the end ---------------------------------------------------------------------------------

    def close(self, *, failed: bool = False) -> int:
        """End the attempt: wait for a background save, record ``attempt.ended``; returns :attr:`exit_code`.

        Without ``failed`` it is collective (every rank closes). ``failed``: an error is
        propagating; the attempt is recorded as failed and the process group (possibly broken
        by a lost peer) is left alone.
        """
        if self._closed:
            return self.exit_code
        self._closed = True
        try:
            if self.epoch is not None:
                self._end_failed() if failed else self._end()
        except BaseException:
            failed = True
            self._end_failed()
            raise
        finally:
            self._release(failed)
        return self.exit_code

    def _end(self) -> None:
        self._collect(block=True)
        last_step = max(self._last_logged, self._last_save.step if self._last_save else 0, self._restored_step or 0)
        ending = attempt_ending(self._stop, self._last_save, last_step, self._restored_step)
        if ending.warning is not None:
            self._say(ending.warning, error=True)
        if ending.recorded:
            self.recorder.end_attempt(ending.status, last_step, signal_name=ending.signal_name)
        self._report(ending)
        fenced_by = self.recorder.fenced_by  # rank 0 alone learns this (a NullRecorder never does)
        if not ending.final and fenced_by is not None:
            self._report(fenced_ending(fenced_by))

    def _report(self, ending: AttemptEnding) -> None:
        self.exit_code, self.status, self.message = ending.exit_code, ending.status, ending.message
        if ending.notice is not None:
            self._say(ending.notice)

    def _end_failed(self) -> None:
        self.exit_code, self.status = EXIT_PROBLEM, AttemptStatus.FAILED
        self._drain_background()
        last_step = max(self._last_logged, self._restored_step or 0)
        try:
            self.recorder.end_attempt(AttemptStatus.FAILED, last_step)
        except LedgerError as err:  # the original error matters more; say why the record is missing
            print(f"[ckpt-ledger] could not record the failed attempt: {err}", file=sys.stderr, flush=True)

    def _drain_background(self) -> None:
        """After a failure: give the background writer a bounded time to record its end."""
        if self.checkpointer is None or self.checkpointer.in_flight is None:
            return
        try:
            self.checkpointer.wait(timeout_s=30.0)
        except BackgroundCheckpointError as err:
            print(f"[ckpt-ledger] {err}", file=sys.stderr, flush=True)

    def _release(self, failed: bool) -> None:
        if self._owns_watch:
            self.preemption.uninstall()
        if failed:
            self._drain_background()  # the writer uses the recorder: it must be done before the recorder closes
        self.recorder.close()
        self.recorder = NullRecorder()  # nothing more is recorded
        # A broken multi-process group could block its destruction until the collective timeout;
        # our own one-process group has no peers to wait for.
        if self.ctx.owns_group and (not failed or self.ctx.world_size == 1) and dist.is_initialized():
            self.checkpointer = None
            dist.destroy_process_group()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.close(failed=exc_type is not None)

    # -- checks ----------------------------------------------------------------------------------

    def _require_started(self, what: str) -> None:
        if self._closed:
            raise BadInputError(f"{what}() on a closed CheckpointManager")
        if self._restored_step is None:
            raise BadInputError(f"{what}() before restore(): call `start = ckpt.restore(state)` once before the loop")

    def _say(self, message: str, *, error: bool = False) -> None:
        if self.verbose and self.ctx.is_coordinator:
            print(f"[ckpt-ledger] {'error: ' if error else ''}{message}", file=sys.stderr if error else sys.stdout,
                  flush=True)
