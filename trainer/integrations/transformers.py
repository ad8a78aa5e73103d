"""``LedgerCallback``: a Hugging Face ``TrainerCallback`` whose checkpoints, resume and retention go through the ledger.

>>> from trainer.integrations.transformers import LedgerCallback                     # doctest: +SKIP
>>> t = Trainer(model=model, args=TrainingArguments(output_dir=..., save_steps=500, ...),
...             callbacks=[LedgerCallback(run_dir, keep_last=3)])                     # doctest: +SKIP
>>> t.train(resume_from_checkpoint=LedgerCallback.resume_path(run_dir))            # doctest: +SKIP

The Trainer writes ``output_dir/checkpoint-N`` as usual. Once it has finished (``on_save``)
the callback records ``checkpoint.started``, moves the directory into a fresh
attempt-namespaced directory of the run's blob store (``RUN_DIR/blobs/<id>/e<epoch>/checkpoint``,
a rename on one filesystem), fsyncs and hashes every file (``shard.written``) and commits.
So ``output_dir`` only ever holds a save in progress, and nothing there decides anything.

Two Trainer options decide by directory listing and are refused when the callback is used
(at ``Trainer(...)``, with the replacement named in the message):

* ``save_total_limit`` — rotation by listing ``checkpoint-*``; use ``LedgerCallback(keep_last=...)``:
  the ledger's retention, which never removes the latest, best, pinned or resume checkpoint;
* ``load_best_model_at_end`` — finds the best by directory; the ledger tracks ``best`` from the
  recorded eval metrics (``ckpt-ledger export RUN --checkpoint best``).

Eval metrics (``eval_*``) become ``metric.recorded``; ``metric``/``mode`` rank ``best``.
SIGTERM/SIGUSR1 make the Trainer save at the end of the current step and stop; the attempt is
recorded ``preempted`` and :attr:`LedgerCallback.exit_code` is 75 ("requeue me"). A Trainer
that raises (no callback hook sees it) leaves its attempt open; the next attempt marks it crashed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ledger import RetentionPolicy
from ledger.statuses import AttemptStatus
from trainer.integrations import require
from trainer.integrations.recorder import CheckpointRecorder, ResumeTarget, find_resume_target
from trainer.preemption import PreemptionWatch

_hf = require("transformers", "transformers")

#: The name of the Trainer's checkpoint directory inside the ledger's checkpoint directory.
ENTRY = "checkpoint"
#: Eval outputs that are speeds and timings, not measurements of the model (not recorded).
_NOT_METRICS = ("_runtime", "_per_second", "_samples", "_steps")

# The resume target each run directory was last given by resume_path() in this process: the Trainer
# does not tell callbacks which checkpoint it loaded, so the attempt's resumed_from comes from here.
_chosen: dict[Path, ResumeTarget] = {}


class LedgerCallback(_hf.TrainerCallback):
    """Record every checkpoint the Trainer writes in the run's ledger; retention and resume by the ledger.

    ``keep_last``/``keep_every``/``keep_best`` are the ledger's retention policy (``None``: off).
    ``metric``/``mode`` rank ``best`` (default ``eval_loss``, lower is better).
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, keep_last: int | None = None,
                 keep_every: int | None = None, keep_best: int | None = None,
                 metric: str = "eval_loss", mode: str = "min") -> None:
        self.run_dir = Path(run_dir)
        self.recorder = CheckpointRecorder(
            run_dir, integration="transformers",
            policy=RetentionPolicy(keep_last=keep_last, keep_every=keep_every, keep_best=keep_best),
            best_metric=metric, best_mode=mode,
        )
        self._flag = PreemptionWatch(chain=True)
        self._preempted_by: str | None = None
        self._stack = "transformers"

    @staticmethod
    def resume_path(run_dir: str | os.PathLike[str]) -> str | None:
        """The ``resume_from_checkpoint`` to pass to ``Trainer.train``: the ledger's verified resume target.

        Hashes are re-checked; a corrupt newest checkpoint is recorded (``corruption.detected``)
        and the previous good one returned. ``None`` when there is nothing to resume.
        """
        target = find_resume_target(run_dir, entry=ENTRY)
        if target is None:
            return None
        _chosen[Path(run_dir).resolve()] = target
        return str(target.path)

    @property
    def exit_code(self) -> int:
        """0, or 75 (EX_TEMPFAIL: "requeue me") when training stopped preempted after saving."""
        return self.recorder.exit_code

    # -- the attempt -------------------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        refuse_directory_decisions(args)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        refuse_directory_decisions(args)
        self._stack = f"transformers-{args.parallel_mode.value}" if args.world_size > 1 else "transformers"
        if state.is_world_process_zero and self.recorder.attempt is None:
            # The Trainer has already restored state.global_step: it matches the target resume_path() chose.
            chosen = _chosen.get(self.run_dir.resolve())
            resumed = chosen.path if chosen is not None and state.global_step == chosen.step > 0 else None
            self.recorder.begin_attempt(world_size=args.world_size, stack=self._stack, resumed_from_path=resumed)
        self._flag.install()

    def _recording(self, state: Any) -> bool:
        """Rank 0 inside ``train()`` (``evaluate()`` on its own begins no attempt and records nothing)."""
        return state.is_world_process_zero and self.recorder.recording

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._recording(state):
            self.recorder.step_completed(state.global_step)
        signal_name = self._flag.received
        if args.world_size > 1 and _any_rank(signal_name is not None, args.device):
            signal_name = signal_name or "SIGTERM"  # any rank's signal stops every rank, at the same step
        if signal_name is not None:
            # Save at this step boundary and stop; the attempt is recorded preempted once the save is committed.
            self._preempted_by = signal_name
            control.should_save = True
            control.should_training_stop = True
        if control.should_save and state.is_world_process_zero:
            staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if staged.exists():
                # Left by an interrupted save (a recorded one was moved into the run): the Trainer would write
                # over it and keep any file it does not rewrite, so start from an empty directory.
                shutil.rmtree(staged)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if self._recording(state) and logs and isinstance(logs.get("loss"), (int, float)):
            self.recorder.step_completed(state.global_step, {"loss": float(logs["loss"])})

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        if not self._recording(state) or not metrics:
            return
        measured = {name: float(value) for name, value in metrics.items()
                    if name.startswith("eval_") and isinstance(value, (int, float)) and not name.endswith(_NOT_METRICS)}
        self.recorder.record_metrics(state.global_step, measured)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _wait_for_every_rank(args)  # each rank writes its own RNG state file into the checkpoint
        if self._recording(state):
            step = state.global_step
            staged = Path(args.output_dir) / f"checkpoint-{step}"
            checkpoint_id = self.recorder.begin_checkpoint(step, world_size=args.world_size, stack=self._stack)
            target = self.recorder.checkpoint_dir(checkpoint_id) / ENTRY
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(staged, target)  # a rename on one filesystem; a copy then delete across them
            except OSError as err:
                self.recorder.abort_checkpoint(checkpoint_id, f"could not move {staged} into the run: {err}")
                raise
            self.recorder.commit_directory(checkpoint_id, step)
            if self._preempted_by is not None:
                self.recorder.end_attempt(AttemptStatus.PREEMPTED, step, signal_name=self._preempted_by)
        _wait_for_every_rank(args)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flag.uninstall()
        if state.is_world_process_zero:
            self.recorder.end_attempt(AttemptStatus.COMPLETED, state.global_step)
            self.recorder.close()


def refuse_directory_decisions(args: Any) -> None:
    """Refuse Trainer options that pick or delete checkpoints by directory listing (see the module doc)."""
    if args.save_total_limit:
        raise ValueError(
            f"TrainingArguments(save_total_limit={args.save_total_limit}) would delete checkpoints by directory "
            f"listing; with LedgerCallback retention is the ledger's: drop save_total_limit and pass "
            f"LedgerCallback(run_dir, keep_last={args.save_total_limit})"
        )
    if args.load_best_model_at_end:
        raise ValueError(
            "TrainingArguments(load_best_model_at_end=True) finds the best checkpoint by directory; with "
            "LedgerCallback the ledger tracks best from the eval metrics: drop it and load the best with "
            "`ckpt-ledger export RUN_DIR --checkpoint best`"
        )


def _any_rank(flag: bool, device: Any) -> bool:
    """Whether ``flag`` is set on any rank (a collective: every rank calls it at the same step)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _wait_for_every_rank(args: Any) -> None:
    if args.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
