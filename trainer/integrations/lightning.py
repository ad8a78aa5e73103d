"""``LedgerCheckpoint``: a PyTorch Lightning callback whose checkpoints, resume and retention go through the ledger.

>>> from trainer.integrations.lightning import LedgerCheckpoint          # doctest: +SKIP
>>> cb = LedgerCheckpoint(run_dir, every_n_train_steps=500, keep_last=3, keep_best=1,
...                       monitor="val_loss", mode="min")                # doctest: +SKIP
>>> trainer = L.Trainer(max_steps=N, callbacks=[cb])                     # doctest: +SKIP
>>> trainer.fit(model, datamodule, ckpt_path=LedgerCheckpoint.resume_path(run_dir))  # doctest: +SKIP

Lightning writes each checkpoint (``trainer.save_checkpoint``: one file, or a directory of
files under FSDP/DeepSpeed) into a fresh attempt-namespaced directory of the run's blob
store, ``RUN_DIR/blobs/<id>/e<epoch>/model.ckpt``; once every rank has written, rank 0
fsyncs, hashes and records each file, then commits. Resume never looks at a directory:
:meth:`LedgerCheckpoint.resume_path` is the projection's resume target with its hashes
re-checked. ``ModelCheckpoint``'s ``save_top_k`` is replaced by the ledger's retention
(``keep_last``/``keep_every``/``keep_best``), which never removes the latest, best,
pinned, in-flight or resume checkpoint.

Why a Callback and not a ``CheckpointIO`` plugin: sharded strategies (FSDP, DeepSpeed)
write through ``torch.distributed.checkpoint`` and bypass ``CheckpointIO``, and users may
already have one of their own; hashing after the write reads page-cache-hot files.

Preemption: on SIGTERM (Lightning's own notifier, SLURM or not) or SIGUSR1 the callback
saves at the end of the current step, records ``preemption.signalled`` and
``attempt.ended(preempted)`` and stops training. A SIGTERM makes Lightning end ``fit``
with ``SIGTERMException``, whose exit code the callback sets to 75 ("requeue me"); after
a SIGUSR1 ``fit`` returns and :attr:`LedgerCheckpoint.exit_code` is 75.
"""

from __future__ import annotations

import os
from typing import Any

from ledger import FencedError, RetentionPolicy
from ledger.statuses import AttemptStatus
from trainer.integrations import require
from trainer.integrations.recorder import CheckpointRecorder, find_resume_target
from trainer.preemption import PreemptionWatch

_pl = require("lightning.pytorch", "lightning")
_SIGTERMException = require("lightning.pytorch.utilities.exceptions", "lightning").SIGTERMException

#: The name Lightning's checkpoint (file or sharded directory) gets inside the checkpoint directory.
ENTRY = "model.ckpt"


class LedgerCheckpoint(_pl.callbacks.Checkpoint):
    """Checkpoint every ``every_n_train_steps`` optimizer steps (and at the end) into the run's ledger.

    ``keep_last``/``keep_every``/``keep_best`` are the ledger's retention policy (``None``:
    that rule is off; all off keeps everything). ``monitor``/``mode`` name the metric that
    ranks ``best`` (recorded as ``metric.recorded`` whenever validation logs it; a metric
    that arrives after its checkpoint still promotes it). Being a ``Checkpoint``, it also
    stops Lightning from adding its default ``ModelCheckpoint``.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, every_n_train_steps: int | None = None,
                 keep_last: int | None = None, keep_every: int | None = None, keep_best: int | None = None,
                 monitor: str | None = None, mode: str = "min", save_on_train_end: bool = True) -> None:
        if every_n_train_steps is not None and (not isinstance(every_n_train_steps, int) or every_n_train_steps < 1):
            raise ValueError(f"every_n_train_steps must be a positive integer or None, got {every_n_train_steps!r}")
        if keep_best is not None and monitor is None:
            raise ValueError("keep_best needs monitor= (the metric that ranks checkpoints, e.g. monitor='val_loss')")
        self.run_dir = os.fspath(run_dir)
        self.every_n_train_steps = every_n_train_steps
        self.monitor = monitor
        self.save_on_train_end = save_on_train_end
        self.recorder = CheckpointRecorder(
            run_dir, integration="lightning",
            policy=RetentionPolicy(keep_last=keep_last, keep_every=keep_every, keep_best=keep_best),
            best_metric=monitor, best_mode=mode, settings={"every_n_train_steps": every_n_train_steps},
        )
        self._flag = PreemptionWatch(chain=True)
        self._last_saved_step: int | None = None
        self._last_seen_step: int | None = None
        self._stopping = False  # a preemption signal was acted on: nothing more is saved or recorded
        self._stack = "lightning"

    @staticmethod
    def resume_path(run_dir: str | os.PathLike[str]) -> str | None:
        """The checkpoint ``trainer.fit(ckpt_path=...)`` should load: the ledger's verified resume target.

        Hashes are re-checked; a corrupt newest checkpoint is recorded (``corruption.detected``)
        and the previous good one returned. ``None`` when there is nothing to resume.
        """
        target = find_resume_target(run_dir, entry=ENTRY)
        return str(target.path) if target is not None else None

    @property
    def exit_code(self) -> int:
        """0, or 75 (EX_TEMPFAIL: "requeue me") when training stopped preempted after saving."""
        return self.recorder.exit_code

    @property
    def state_key(self) -> str:
        return f"LedgerCheckpoint{{run_dir={self.run_dir!r}}}"

    # -- the attempt -------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        # Registered strategies carry a short name; others (DDPStrategy, FSDPStrategy) are named after their class.
        name = getattr(strategy, "strategy_name", None) or type(strategy).__name__.removesuffix("Strategy").lower()
        self._stack = f"lightning-{name}"

    def _begin_attempt(self, trainer: Any) -> None:
        # Begun once Lightning has restored (not in setup): trainer.ckpt_path is then what fit() loaded,
        # and its checkpoint is this attempt's resumed_from.
        if trainer.is_global_zero and self.recorder.attempt is None:
            self.recorder.begin_attempt(world_size=trainer.world_size, stack=self._stack,
                                        resumed_from_path=trainer.ckpt_path)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._begin_attempt(trainer)
        # Installed after Lightning's own handlers (registered just before training runs), chaining to them.
        self._flag.install()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_seen_step or self._stopping:  # accumulating gradients, or already stopped
            return
        self._last_seen_step = step
        if trainer.is_global_zero:
            self.recorder.step_completed(step, _loss_of(outputs))
        signal_name = self._flag.received or ("SIGTERM" if trainer.received_sigterm else None)
        stop = signal_name is not None
        if trainer.world_size > 1:  # any rank's signal stops every rank, at the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._stopping = True
            self._save(trainer, step)
            if trainer.is_global_zero:
                self.recorder.end_attempt(AttemptStatus.PREEMPTED, step, signal_name=signal_name or "SIGTERM")
            trainer.should_stop = True
        elif self.every_n_train_steps and step % self.every_n_train_steps == 0:
            self._save(trainer, step)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.recorder.recording:
            return
        metrics = {}
        for name, value in trainer.callback_metrics.items():
            if name == self.monitor or name.startswith("val"):
                scalar = _scalar(value)
                if scalar is not None:
                    metrics[name] = scalar
        self.recorder.record_metrics(trainer.global_step, metrics)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._stopping and self.save_on_train_end and trainer.global_step > 0:
            self._save(trainer, trainer.global_step)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._flag.uninstall()
        # A run already at max_steps skips training (and on_train_start): the attempt still records itself.
        self._begin_attempt(trainer)
        if trainer.is_global_zero:
            self.recorder.end_attempt(AttemptStatus.COMPLETED, trainer.global_step)
        self.recorder.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._flag.uninstall()
        fenced = isinstance(exception, FencedError)  # a newer attempt owns the run: record nothing more
        if trainer.is_global_zero and self.recorder.recording and not fenced:
            if isinstance(exception, _SIGTERMException):
                # Stopped outside a training step (e.g. during validation): nothing new was saved.
                self.recorder.end_attempt(AttemptStatus.PREEMPTED, trainer.global_step, signal_name="SIGTERM")
            else:
                self.recorder.end_attempt(AttemptStatus.FAILED, trainer.global_step)
        if isinstance(exception, _SIGTERMException) and self.recorder.ended == AttemptStatus.PREEMPTED:
            exception.code = self.recorder.exit_code  # SIGTERMException is a SystemExit: exit 75, "requeue me"
        self.recorder.close()

    # -- saving --------------------------------------------------------------------------------

    def _save(self, trainer: Any, step: int) -> None:
        """Save at ``step`` through Lightning (every rank takes part), recording it on rank 0."""
        if step == self._last_saved_step:
            return
        checkpoint_id, path = None, None
        if trainer.is_global_zero:
            checkpoint_id = self.recorder.begin_checkpoint(step, world_size=trainer.world_size, stack=self._stack)
            path = str(self.recorder.checkpoint_dir(checkpoint_id) / ENTRY)
        path = trainer.strategy.broadcast(path, src=0)  # sharded strategies need one path on every rank
        try:
            trainer.save_checkpoint(path)  # returns once every rank has written (it ends with a barrier)
        except Exception as err:
            if checkpoint_id is not None:
                self.recorder.abort_checkpoint(checkpoint_id, f"Lightning's save failed: {err}")
            raise
        if checkpoint_id is not None:
            self.recorder.commit_directory(checkpoint_id, step)
        self._last_saved_step = step


def _scalar(value: Any) -> float | None:
    """A Python float from a logged metric (a 0-d tensor or a number), else ``None``."""
    if hasattr(value, "numel"):
        return float(value.detach().cpu().item()) if value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) else None


def _loss_of(outputs: Any) -> dict[str, float]:
    """The training step's loss, for ``step.completed`` (empty when the step returned none)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    scalar = _scalar(loss) if loss is not None else None
    return {"loss": scalar} if scalar is not None else {}
