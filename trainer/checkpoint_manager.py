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

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch.distributed as dist

from ledger import LedgerError, RetentionPolicy, View
from ledger.blobs import blob_store_for
from ledger.run_address import is_database_url, parse_run_address
from ledger.time_retention import parse_duration
from trainer.checkpoint_state import (  # noqa: F401 - unmappable_checkpoint_message is re-exported
    DCPStateDicts,
    StateDictIO,
    TrainingState,
    restore_checkpoint,
    unmappable_checkpoint_message,
)
from trainer.checkpointing import BackgroundCheckpointError, Candidate, Checkpointer, SaveOutcome
from trainer.dcp_codec import CHECKPOINT_CODECS
from trainer.errors import EXIT_PREEMPTED, EXIT_PROBLEM, BadInputError, StartRefusedError
from trainer.identity import config_hash, ledger_version, user_code_id
from trainer.run_recorder import RunRecorder
from trainer.preemption import PreemptionWatch
from trainer.pretrained import read_pretrained
from trainer.process_group import DistContext, all_reduce_max, broadcast_object, join_current_or_single, slurm_facts
from trainer.sources import StartPlan, choose_start, honoured_resume


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What :meth:`CheckpointManager.save` did, identical on every rank."""

    checkpoint_id: str | None
    step: int
    status: str
    """``committed``, ``in_flight`` (being written in the background), ``aborted`` or ``fenced``."""
    reason: str | None = None


def _detect_stack(state: TrainingState) -> str:
    """The label recorded for a user's loop: ``fsdp`` when a module is FSDP2-sharded, else ``ddp``."""
    from torch.distributed.fsdp import FSDPModule

    sharded = any(isinstance(m, FSDPModule) for module in state.modules.values() for m in module.modules())
    return "fsdp" if sharded else "ddp"


def _positive(name: str, value: object, *, integer: bool) -> None:
    if value is None:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise BadInputError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")


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
                 keep_without_metric: bool = False, best_metric: str = "eval_loss", best_mode: str = "min", async_save: bool = True,
                 codec: str = "none", blobs: str | None = None, resume: str | None = None,
                 pretrained: str | None = None, config: Mapping[str, Any] | None = None, log_every: int = 10,
                 stack: str | None = None, topology: Mapping[str, int] | None = None,
                 state_io: StateDictIO | None = None, dist_timeout_s: float = 1800.0,
                 preemption: PreemptionWatch | None = None, verbose: bool = True) -> None:
        # Every argument is checked before anything is created or joined: bad input changes nothing.
        run_dir = str(run_dir) if run_dir is not None else ""
        if not run_dir:
            raise BadInputError("run_dir must be a non-empty path")
        try:
            parse_run_address(run_dir)  # a postgresql:// run must be well-formed and carry no password
        except ValueError as err:
            raise BadInputError(str(err)) from None
        _positive("save_every", save_every, integer=True)
        if save_every_seconds is not None:
            try:
                save_every_seconds = parse_duration(save_every_seconds, name="save_every_seconds")
            except ValueError as err:
                raise BadInputError(str(err)) from None
        _positive("log_every", log_every, integer=True)
        if best_mode not in ("min", "max"):
            raise BadInputError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if not isinstance(best_metric, str) or not best_metric:
            raise BadInputError("best_metric must be a non-empty metric name")
        if codec not in CHECKPOINT_CODECS:
            raise BadInputError(f"codec must be one of {', '.join(CHECKPOINT_CODECS)}, got {codec!r}")
        if not isinstance(async_save, bool):
            raise BadInputError(f"async_save must be True or False, got {async_save!r}")
        if resume is not None and (not isinstance(resume, str) or not resume.strip()):
            raise BadInputError("resume must be a checkpoint id, 'latest' or 'best'")
        if pretrained is not None and (not isinstance(pretrained, str) or not pretrained):
            raise BadInputError("pretrained must be a path to a torch state-dict file")
        try:
            self.retention = RetentionPolicy(keep_last=keep_last, keep_every=keep_every, keep_best=keep_best,
                                             keep_every_seconds=keep_every_seconds, keep_for=keep_for,
                                             keep_without_metric=keep_without_metric)
        except ValueError as err:
            raise BadInputError(str(err).split("\n")[0]) from None
        self.blobs = self._blob_location(run_dir, blobs)
        self.run_dir = run_dir
        self.save_every, self.save_every_seconds = save_every, save_every_seconds
        self.best_metric, self.best_mode = best_metric, best_mode
        self.async_save, self.codec = async_save, codec
        self.resume, self.pretrained = resume, pretrained
        self.config = dict(config or {})
        self.log_every = log_every
        self.stack, self.topology = stack, dict(topology) if topology is not None else None
        self.state_io: StateDictIO = state_io or DCPStateDicts()
        self.verbose = verbose

        self.exit_code = 0
        """0; 75 (``EX_TEMPFAIL``) when preempted (its state saved: requeue me); 1 when fenced or failed.
        Final once the manager is closed."""
        self.message: str | None = None
        """One line for the user when the attempt did not complete."""
        self.status = "running"
        """How the attempt ended once closed: ``completed``, ``preempted``, ``fenced`` or ``failed``."""
        self.recorder: RunRecorder | None = None
        self.checkpointer: Checkpointer | None = None
        self.epoch: int | None = None
        self.restored_from: str | None = None
        self._restored_step: int | None = None
        self._last_logged = 0
        self._last_save: SaveResult | None = None
        self._last_save_time = time.monotonic()
        self._stop: tuple[str, int] | None = None  # ("preempted", signum) or ("fenced", epoch)
        self._stop_step: int | None = None
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

    @staticmethod
    def _blob_location(run_dir: str, blobs: str | None) -> str | None:
        """Where shard blobs go: ``None`` (the run directory), a local directory (made absolute, so
        read commands find it from anywhere) or an fsspec URL without credentials."""
        if blobs is None or str(blobs) == run_dir:
            return None
        text = os.fspath(blobs)
        if "://" not in text:
            if "://" not in run_dir and os.path.abspath(text) == os.path.abspath(run_dir):
                return None  # the run directory itself, however it was spelled
            return os.path.abspath(text)
        from ledger.blobs_remote import check_blob_url

        try:
            return check_blob_url(text)
        except ValueError as err:
            raise BadInputError(str(err)) from None

    def _require_blobs_for_database_run(self) -> None:
        """Rank 0: a run in a database has no directory for its shards; its first start must say where."""
        if self.blobs is None and is_database_url(self.run_dir) \
                and not self.recorder.ledger.events(tags=["run.started"]):  # type: ignore[union-attr]
            raise BadInputError(f"{parse_run_address(self.run_dir)} is a run in a database, which has no directory "
                                "for checkpoint files: give it one with --blobs DIR|s3://BUCKET/PREFIX (blobs=)")

    def _recorded_blobs(self) -> tuple[str | None, str | None]:
        """Rank 0: ``(blob URL run.started recorded, error)`` — asking for another place than the recorded one is an error."""
        recorded = self.recorder.blobs.url  # type: ignore[union-attr]
        if self.blobs is not None and self.blobs.rstrip("/") != (recorded or "").rstrip("/"):
            return recorded, (f"this run keeps its checkpoints in {recorded or 'the run directory'} (recorded in "
                              f"run.started), not {self.blobs}; drop blobs=/--blobs to use the recorded place")
        return recorded, None

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
        stack = self.stack or _detect_stack(entries)
        topology = self.topology or {"tp": 1, "pp": 1, "dp": self.ctx.world_size}
        self.stack, self.topology = stack, topology

        view: View | None = None
        where: tuple[str | None, str | None] | None = None
        failure: LedgerError | ValueError | OSError | None = None
        if self.ctx.is_coordinator:  # rank 0 alone opens the ledger and records the run once
            try:
                view = self._open_recorder()
                where = self._recorded_blobs()
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
        store = self.recorder.blobs if self.recorder is not None else blob_store_for(blobs_url, self.run_dir)
        self.checkpointer = Checkpointer(self.ctx, store, self.recorder, stack=stack, topology=topology,
                                         retention=self.retention, background=self.async_save, codec=self.codec,
                                         upload_bar=self.verbose)
        self._timings = self.checkpointer.timings
        plan = choose_start(self.checkpointer, view, resume=honoured_resume(self.resume), pretrained=self.pretrained)
        if plan.error is not None:
            self._report_corruption(plan)
            raise StartRefusedError(plan.error)
        try:
            step = self._load(plan, entries)
        except BaseException:
            self._report_corruption(plan)
            raise
        self.epoch = self._begin_attempt(plan)
        self._restored_step = self._last_logged = step
        self.restored_from = plan.candidate.checkpoint_id if plan.candidate is not None else None
        self._last_save_time = time.monotonic()
        return step

    def _open_recorder(self) -> View:
        """Rank 0: open the ledger, record ``run.started`` (once per run); the projection now."""
        self.recorder = RunRecorder(self.run_dir)
        self._require_blobs_for_database_run()
        recorded = {**self.config, **self._policy_config()}
        _, same = self.recorder.start_run(recorded, config_hash(recorded), user_code_id(), blobs=self.blobs,
                                         ledger_version=ledger_version())
        if not same:
            self._say("note: this config differs from the one the run started with (see run.started)")
        return self.recorder.projection()

    def _policy_config(self) -> dict[str, Any]:
        """The fields the ledger's decisions read from ``run.started`` (best rule, retention for gc)."""
        policy = {name: getattr(self.retention, name) for name in self.retention.__dataclass_fields__}
        return {**policy, "best_metric": self.best_metric, "best_mode": self.best_mode}

    def _load(self, plan: StartPlan, entries: TrainingState) -> int:
        if plan.candidate is not None:
            return self._resume(plan.candidate, entries)
        if plan.pretrained is not None:
            weights = read_pretrained(plan.pretrained)
            try:
                self.state_io.load_full_model_state(entries.only_module("pretrained="), weights)
            except (RuntimeError, KeyError, ValueError) as err:
                raise BadInputError(f"pretrained {plan.pretrained}: does not fit the model "
                                    f"({' '.join(str(err).split())[:200]})") from None
            self._say(f"initialised model weights from {plan.pretrained} (optimizer, schedule and step start fresh)")
        return 0

    def _resume(self, candidate: Candidate, entries: TrainingState) -> int:
        step = restore_checkpoint(entries, self.state_io, self.checkpointer, candidate, rank=self.ctx.rank,
                                  layout=(self.stack, self.ctx.world_size, self.topology))
        if candidate.world_size != self.ctx.world_size:
            self._say(f"world size changed {candidate.world_size} -> {self.ctx.world_size}: "
                      "resumed, but not bitwise-comparable with an unchanged run")
        self._say(f"resumed from {candidate.checkpoint_id} at step {step}")
        return step

    def _begin_attempt(self, plan: StartPlan) -> int:
        """Rank 0 records the attempt and any corruption found; every rank learns the epoch."""
        epoch = None
        if self.recorder is not None:
            candidate = plan.candidate
            previous = None if candidate is None else {
                "world_size": candidate.world_size, "stack": candidate.stack, **candidate.topology}
            epoch = self.recorder.begin_attempt(
                world_size=self.ctx.world_size, stack=self.stack, topology=self.topology,
                resumed_from=candidate.checkpoint_id if candidate else None, slurm=slurm_facts(os.environ),
                previous_topology=previous,
            )
            self._report_corruption(plan)
        return broadcast_object(epoch)

    def _report_corruption(self, plan: StartPlan) -> None:
        if self.recorder is None:
            return
        for bad in plan.bad_shards:
            self.recorder.report_corruption(bad.checkpoint_id, bad.location, bad.expected_hash, bad.found_hash)
            self._say(f"corruption: {bad.detail}; checkpoint {bad.checkpoint_id} will not be loaded")

    # -- the loop --------------------------------------------------------------------------------

    def log(self, step: int, **metrics: float) -> None:
        """Record ``step.completed`` with ``metrics`` (rank 0's values; appended in batches of ``log_every``)."""
        self._require_started("log")
        self._check_step("log", step, floor=self._last_logged)
        values = self._check_metrics(metrics)
        self._last_logged = step
        if self.recorder is not None:
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
        values = self._check_metrics(metrics)
        last = self._last_save
        checkpoint_id = last.checkpoint_id if last is not None and last.step == step and last.status in (
            "committed", "in_flight") else None
        for name, value in values.items():  # after checkpoint.started, even while it is being written
            self.checkpointer.record_metric(name, value, step=step, checkpoint_id=checkpoint_id)

    @property
    def committed_step(self) -> int | None:
        """The newest step known committed: saved by this attempt, else restored (``None``: neither)."""
        last = self._last_save
        if last is not None and last.status == "committed":
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
        values = self._check_metrics(dict(metrics or {}))
        last = self._last_save
        if last is not None and last.step == step and last.status in ("committed", "in_flight"):
            if block:
                self._collect(block=True)
            return self._last_save
        self._check_step("save", step, floor=max(self._restored_step or 0, last.step if last else 0))
        if step == self._restored_step and self.restored_from is not None:
            raise BadInputError(f"save(step={step}): step {step} is already committed as checkpoint "
                                f"{self.restored_from} (restored from it); save a later step")
        if self._stop is not None and self._stop[0] == "fenced":
            return self._fenced_result(step)

        started = time.perf_counter()  # the stall recorded in the timings starts here
        self._collect(block=True)  # at most one checkpoint in flight: its staging buffers are reused
        payload = entries.pack(self.state_io, step=step, rank=self.ctx.rank)
        if block or not self.async_save:
            outcome = self.checkpointer.save(payload, step=step, epoch=self.epoch, started=started)
        else:
            outcome = self.checkpointer.save_async(payload, step=step, epoch=self.epoch, started=started)
        self._last_save_time = time.monotonic()
        if outcome is None:
            result = SaveResult(self.checkpointer.in_flight, step, "in_flight")
            self._last_save = result
        else:
            result = self._take(outcome)
        if result.status in ("committed", "in_flight"):
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
        fenced_by = self.recorder.fenced_by if self.recorder is not None and self.recorder.fenced_by else 0
        failed = int(self._background_error is not None)
        signum, fenced_by, failed = all_reduce_max([signum, fenced_by, failed], self.ctx.device)
        if failed:  # every rank stops at this boundary, the one whose writer failed says why
            raise self._background_error or BackgroundCheckpointError(
                "a peer's background checkpoint writer failed (its error is in that rank's output)")
        if fenced_by:
            self._stop, self._stop_step = ("fenced", fenced_by), step
        elif signum and self._stop is None:
            self._stop, self._stop_step = ("preempted", signum), step
        return self._stop is not None

    @property
    def timings(self) -> list:
        """What each checkpoint cost this rank (:class:`trainer.checkpointing.CheckpointTiming`)."""
        return self._timings

    # -- outcomes --------------------------------------------------------------------------------

    def _take(self, outcome: SaveOutcome) -> SaveResult:
        """Learn how a checkpoint ended (rank 0 decided; every rank has the same outcome)."""
        if outcome.committed:
            result = SaveResult(outcome.checkpoint_id, outcome.step, "committed")
            self._say(f"checkpoint {outcome.checkpoint_id} committed at step {outcome.step}")
        elif outcome.fenced:
            self._stop = ("fenced", outcome.fenced_by)
            result = self._fenced_result(outcome.step, outcome.checkpoint_id)
        else:
            result = SaveResult(outcome.checkpoint_id, outcome.step, "aborted", outcome.reason)
            self._say(f"checkpoint {outcome.checkpoint_id} aborted: {outcome.reason}", error=True)
        if self._last_save is None or self._last_save.checkpoint_id == outcome.checkpoint_id \
                or self._last_save.step <= outcome.step:
            self._last_save = result
        return result

    def _fenced_result(self, step: int, checkpoint_id: str | None = None) -> SaveResult:
        return SaveResult(checkpoint_id, step, "fenced", f"fenced by epoch {self._stop[1]}")

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
        stop = self._stop
        if stop is not None and stop[0] == "fenced":
            return self._fenced(stop[1])
        if stop is not None and stop[0] == "preempted":
            name = signal.Signals(stop[1]).name
            saved = self._last_save
            if saved is not None and saved.step == last_step and saved.status != "committed":
                self.message = f"preempted by {name} at step {last_step} but the checkpoint failed: {saved.reason}"
                self.exit_code, self.status = EXIT_PROBLEM, "failed"
                if self.recorder is not None:
                    self.recorder.end_attempt("failed", last_step)
                return None
            if (saved.step if saved else self._restored_step) != last_step:
                self._say(f"preempted at step {last_step} without a checkpoint of it: a restart resumes from step "
                          f"{saved.step if saved else self._restored_step}", error=True)
            if self.recorder is not None:
                self.recorder.end_attempt("preempted", last_step, signal_name=name)
            self.exit_code, self.status = EXIT_PREEMPTED, "preempted"
            self.message = f"preempted by {name}; state saved at step {saved.step if saved else self._restored_step}"
            self._say(f"preempted by {name}: exiting {EXIT_PREEMPTED} (requeue me)")
        elif self._last_save is not None and self._last_save.step == last_step \
                and self._last_save.status == "aborted":
            # The last step's checkpoint failed: "completed" would promise a checkpoint there is not.
            self.message = f"the checkpoint at the last step {last_step} failed: {self._last_save.reason}"
            self.exit_code, self.status = EXIT_PROBLEM, "failed"
            if self.recorder is not None:
                self.recorder.end_attempt("failed", last_step)
        else:
            self.status = "completed"
            if self.recorder is not None:
                self.recorder.end_attempt("completed", last_step)
        if self.recorder is not None and self.recorder.fenced_by is not None:  # rank 0 alone learns this
            self._fenced(self.recorder.fenced_by)
        return None

    def _fenced(self, fenced_by: int | None) -> None:
        self.exit_code, self.status = EXIT_PROBLEM, "fenced"
        self.message = f"fenced by epoch {fenced_by}: a newer attempt took over this run; this job stops (not restarted)"
        self._say(self.message)  # a progress line: stderr is left to whoever reports the exit (the CLI does)

    def _end_failed(self) -> None:
        self.exit_code, self.status = EXIT_PROBLEM, "failed"
        self._drain_background()
        if self.recorder is not None:
            last_step = max(self._last_logged, self._restored_step or 0)
            try:
                self.recorder.end_attempt("failed", last_step)
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
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
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

    @staticmethod
    def _check_step(what: str, step: object, *, floor: int) -> int:
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise BadInputError(f"{what}(step={step!r}): step must be an integer >= 1")
        if step < floor:
            raise BadInputError(f"{what}(step={step}): steps must not go backwards (already at step {floor}); "
                                "pass the loop's current step")
        return step

    @staticmethod
    def _check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
        values = {}
        for name, value in metrics.items():
            try:
                values[name] = float(value)
            except (TypeError, ValueError):
                raise BadInputError(f"metric {name!r}={value!r} is not a number; pass floats "
                                    "(e.g. float(loss))") from None
        return values

    def _say(self, message: str, *, error: bool = False) -> None:
        if self.verbose and self.ctx.is_coordinator:
            print(f"[ckpt-ledger] {'error: ' if error else ''}{message}", file=sys.stderr if error else sys.stdout,
                  flush=True)
