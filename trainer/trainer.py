"""``Trainer``: the training lifecycle, top to bottom.

``Trainer(config, model_fn=..., data_fn=...)`` joins the process group, builds the
mesh, seeds, builds and parallelizes the model, makes the optimizer and schedule,
reads the ledger's projection, verifies and loads what the run should start from and
begins an attempt. :meth:`Trainer.fit` then trains to the run's step target,
committing coordinated checkpoints, and returns how the attempt ended.

``model_fn() -> nn.Module`` builds the model on CPU (the same on every rank: the
trainer seeds before calling it). ``data_fn(dp_rank, dp_size, seed, device)``
returns the batches of one data-parallel rank: an object with ``next_batch() ->
(inputs, targets)``, ``state_dict()``/``load_state_dict()`` (the data position,
saved per rank) and optionally ``eval_batches()`` (used every ``eval_every`` steps).
"""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.optim.lr_scheduler import LambdaLR

from ledger import LedgerError, RetentionPolicy
from ledger.blobs import blob_store_for
from ledger.faults import crash_point
from trainer.checkpointing import BackgroundCheckpointError, Candidate, Checkpointer, SaveOutcome
from trainer.config import TrainerConfig
from trainer.errors import EXIT_PREEMPTED, EXIT_PROBLEM, BadInputError, StartRefusedError
from trainer.identity import code_id, config_hash
from trainer.journal import RunJournal
from trainer.pretrained import read_pretrained
from trainer.preemption import PreemptionWatch, StopReason
from trainer.process_group import all_reduce_max, all_reduce_mean, broadcast_object, init_distributed, slurm_facts
from trainer.sources import StartPlan, choose_start, honoured_resume
from trainer.stacks import get_stack
from trainer.train_state import load_template, pack, restore_rng, seed_everything, seed_rank, unpack


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How an attempt ended, identical on every rank."""

    status: str
    """``completed``, ``preempted`` or ``fenced``."""
    step: int
    """The step the run is at (and has a committed checkpoint for, unless fenced)."""
    exit_code: int
    """What ``ckpt-ledger train`` exits with: 0, 75 (preempted and saved) or 1."""
    message: str | None = None
    """One line for the user when the attempt did not complete."""


def cross_entropy_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Default loss: mean cross entropy over every position."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor: linear warm-up, then cosine decay to 10% at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def _is_layout_error(err: BaseException) -> bool:
    """Whether a failed load is about the checkpoint's contents, not about a lost peer."""
    causes = [failure[0] for failure in err.failures.values()] if isinstance(err, CheckpointException) else [err]
    return not any(isinstance(cause, dist.DistError) for cause in causes)


def unmappable_checkpoint_message(candidate: Candidate, stack: str, world_size: int, topology: dict[str, int],
                                  err: BaseException) -> str:
    """One line: which layout saved the checkpoint, which one could not load it and why, and what loads it."""
    def layout(stack_name: str, world: int, topo: dict[str, int]) -> str:
        return f"--stack {stack_name} --nproc {world} --tp {topo.get('tp', 1)} --pp {topo.get('pp', 1)}"

    if isinstance(err, CheckpointException):
        reason = "; ".join(f"{type(f[0]).__name__}: {f[0]}" for f in list(err.failures.values())[:1])
    else:
        reason = f"{type(err).__name__}: {err}"
    saved = layout(candidate.stack, candidate.world_size, candidate.topology)
    return (f"checkpoint {candidate.checkpoint_id} (step {candidate.step}) was saved by {saved} and cannot be "
            f"resharded to {layout(stack, world_size, topology)} ({' '.join(reason.split())[:300]}); "
            f"resume it with {saved}")


class Trainer:
    """One attempt of a run: set up in the constructor, trained by :meth:`fit`.

    ``preemption`` is a watch the caller installed earlier (so that a signal arriving
    during setup is not lost); by default the trainer installs its own.
    """

    def __init__(self, config: TrainerConfig, *, model_fn: Callable[[], nn.Module],
                 data_fn: Callable[[int, int, int, torch.device], Any],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 preemption: PreemptionWatch | None = None) -> None:
        self.config = config
        self.loss_fn = loss_fn or cross_entropy_loss
        self.journal: RunJournal | None = None

        # 1. Distributed init: join the process group (gloo on CPU, nccl on CUDA). Signals are
        #    caught from here on: a preemption during setup is acted on at the first step boundary.
        self.ctx = init_distributed(config.dist_timeout_s)
        self._owns_watch = preemption is None
        self.preemption = preemption or PreemptionWatch().install()
        try:
            self._setup(model_fn, data_fn)
        except BaseException:
            self.close(failed=True)
            raise

    def _setup(self, model_fn: Callable[[], nn.Module], data_fn: Callable[..., Any]) -> None:
        cfg, ctx = self.config, self.ctx

        # 2. Device mesh: the stack validates tp/pp against the world and lays out the ranks.
        self.stack = get_stack(cfg.stack, cfg)
        try:
            self.topology = self.stack.topology(ctx.world_size, tp=cfg.tp, pp=cfg.pp)
        except ValueError as err:
            raise BadInputError(str(err)) from None
        self.mesh = self.stack.build_mesh(self.topology, ctx.device.type)
        dp_rank, dp_size = self.stack.data_parallel_coordinates(self.mesh)

        # 3. Seed: the same on every rank, so every rank builds the same initial weights.
        seed_everything(cfg.seed)

        # 4. Model, built on CPU by the job and moved to this rank's device.
        model = model_fn().to(ctx.device)

        # 5. Parallelize with the chosen stack; then give each rank its own random streams (dropout).
        self.model = self.stack.parallelize(model, self.mesh)
        seed_rank(cfg.seed, ctx.rank)

        # 6. Optimizer, LR schedule and this rank's slice of the data.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
        self.data = data_fn(dp_rank, dp_size, cfg.seed, ctx.device)

        # 7. Read the projection: rank 0 alone opens the ledger, records the run's identity once.
        view, blobs = None, None
        if ctx.is_coordinator:
            self.journal = RunJournal(cfg.run_dir)
            canonical = cfg.canonical()
            _, same = self.journal.start_run(canonical, config_hash(canonical), code_id(), blobs=cfg.blobs)
            if not same:
                self._say("note: this config differs from the one the run started with (see run.started)")
            view = self.journal.projection()
            blobs = self._recorded_blobs()
        # Every rank writes its own shards straight to the run's store: it learns where from rank 0.
        blobs_url, error = broadcast_object(blobs)
        if error is not None:
            raise BadInputError(error)
        self.checkpointer = Checkpointer(
            ctx, cfg.run_dir, self.journal, stack=cfg.stack, topology=self.topology.as_dict(),
            retention=RetentionPolicy(keep_last=cfg.keep_last, keep_every=cfg.keep_every, keep_best=cfg.keep_best),
            background=cfg.async_checkpoint, codec=cfg.checkpoint_codec,
            blobs=self.journal.blobs if self.journal is not None else blob_store_for(blobs_url, cfg.run_dir),
        )
        self.checkpoint_timings = self.checkpointer.timings
        self._background_error: BackgroundCheckpointError | None = None

        # 8. Choose the source (explicit resume > automatic resume > pretrained > fresh), verifying
        #    shard hashes; begin the attempt (fencing older ones); then load.
        plan = choose_start(self.checkpointer, view, resume=honoured_resume(cfg.resume), pretrained=cfg.pretrained)
        self.epoch = self._begin_attempt(plan)
        self.step = self._load(plan)
        self._saved_step = self.step if plan.candidate is not None else None

    # -- setup helpers ----------------------------------------------------------------------------

    def _recorded_blobs(self) -> tuple[str | None, str | None]:
        """Rank 0: ``(blob URL run.started recorded, error)`` — another ``blobs`` than the recorded one is an error."""
        recorded = self.journal.blobs.url  # type: ignore[union-attr]
        wanted = self.config.blobs
        if wanted is not None and wanted.rstrip("/") != (recorded or "").rstrip("/"):
            where = recorded or "the run directory"
            return recorded, (f"this run keeps its checkpoints in {where} (recorded in run.started), not {wanted}; "
                              "drop --blobs to use the recorded place")
        return recorded, None

    def _begin_attempt(self, plan: StartPlan) -> int:
        """Rank 0 records the attempt and any corruption found; every rank learns the epoch."""
        answer: tuple[int | None, str | None] | None = None
        if self.journal is not None:
            epoch = None
            if plan.error is None:
                candidate = plan.candidate
                previous = None if candidate is None else {
                    "world_size": candidate.world_size, "stack": candidate.stack, **candidate.topology}
                epoch = self.journal.begin_attempt(
                    world_size=self.ctx.world_size, stack=self.config.stack, topology=self.topology.as_dict(),
                    resumed_from=candidate.checkpoint_id if candidate else None, slurm=slurm_facts(os.environ),
                    previous_topology=previous,
                )
            for bad in plan.bad_shards:
                self.journal.report_corruption(bad.checkpoint_id, bad.location, bad.expected_hash, bad.found_hash)
                self._say(f"corruption: {bad.detail}; checkpoint {bad.checkpoint_id} will not be loaded")
            answer = (epoch, plan.error)
        epoch, error = broadcast_object(answer)
        if error is not None:
            raise StartRefusedError(error)
        return epoch

    def _load(self, plan: StartPlan) -> int:
        """Load the chosen source; returns the step the attempt starts at."""
        if plan.candidate is not None:
            return self._resume(plan.candidate)
        if plan.pretrained is not None:
            weights = read_pretrained(plan.pretrained)
            try:
                self.stack.load_full_model_state(self.model, weights)
            except (RuntimeError, KeyError, ValueError) as err:
                raise BadInputError(f"--pretrained {plan.pretrained}: does not fit the model "
                                    f"({' '.join(str(err).split())[:200]})") from None
            self._say(f"initialised model weights from {plan.pretrained} (optimizer, schedule and step start fresh)")
        return 0

    def _resume(self, candidate: Candidate) -> int:
        rank = self.ctx.rank
        # With a different world size there is no state of "this rank"; continue rank r from r mod old.
        source_rank = rank % candidate.world_size
        model_state, optim_state = self.stack.state_dicts(self.model, self.optimizer)
        template = load_template(model_state=model_state, optim_state=optim_state, rank=source_rank)
        try:
            self.checkpointer.load(candidate, template)
            self.stack.load_state_dicts(self.model, self.optimizer, template["model"], template["optim"])
        except (CheckpointException, KeyError, ValueError, RuntimeError) as err:
            # DCP reshards between stacks and world sizes; what it cannot map is refused with
            # the layout that saved the checkpoint (lost peers are crashes, not refusals).
            here = (self.config.stack, self.ctx.world_size, self.topology.as_dict())
            if here == (candidate.stack, candidate.world_size, candidate.topology) or not _is_layout_error(err):
                raise
            raise BadInputError(unmappable_checkpoint_message(candidate, *here, err)) from None
        trainer_state, rank_state = unpack(template, source_rank)
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        restore_rng(rank_state["rng"])
        self.data.load_state_dict(rank_state["data"])
        if candidate.world_size != self.ctx.world_size:
            self._say(f"world size changed {candidate.world_size} -> {self.ctx.world_size}: "
                      "resumed, but not bitwise-comparable with an unchanged run")
        self._say(f"resumed from {candidate.checkpoint_id} at step {trainer_state['step']}")
        return int(trainer_state["step"])

    # -- the loop -----------------------------------------------------------------------------------

    def fit(self) -> RunOutcome:
        """Train to ``config.steps``; checkpoint, evaluate, stop early on preemption or fencing."""
        try:
            outcome = self._fit()
        except BaseException:
            self._drain_background()
            if self.journal is not None:
                try:
                    self.journal.end_attempt("failed", self.step)
                except LedgerError as err:  # the original error matters more; say why the record is missing
                    print(f"[ckpt-ledger] could not record the failed attempt: {err}", file=sys.stderr)
            self.close(failed=True)
            raise
        self.close()
        return outcome

    def _fit(self) -> RunOutcome:
        cfg = self.config
        if self.step >= cfg.steps:
            self._say(f"run is already at step {self.step} of {cfg.steps}; nothing to do")
            return self._finish("completed", 0)
        self.model.train()
        started, started_step = time.perf_counter(), self.step
        while self.step < cfg.steps:
            inputs, targets = self.data.next_batch()
            loss = self.stack.train_step(self.model, inputs, targets, self.loss_fn)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            crash_point("trainer.after_step")
            if self.journal is not None:
                self.journal.step_completed(self.step, {"loss": float(loss), "lr": self.scheduler.get_last_lr()[0]})
                if self.step % cfg.log_every == 0:
                    self.journal.flush_steps()
            if cfg.print_every and (self.step % cfg.print_every == 0 or self.step == started_step + 1):
                rate = (self.step - started_step) / max(time.perf_counter() - started, 1e-9)
                mean = all_reduce_mean(loss)
                self._say(f"step {self.step}/{cfg.steps}  loss {mean:.4f}  {rate:.1f} steps/s")

            self._collect_background(block=False)
            checkpoint_id = None  # the checkpoint taken at this step, committed or under way
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                # The final checkpoint is synchronous: the attempt ends only once it is durable.
                saved = self._checkpoint(synchronous=self.step == cfg.steps or not cfg.async_checkpoint)
                if saved is None:
                    checkpoint_id = self.checkpointer.in_flight
                elif saved.committed:
                    checkpoint_id = saved.checkpoint_id
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self._evaluate(checkpoint_id)

            stop, detail = self._agree_to_stop()
            if stop == StopReason.FENCED:
                return self._fenced(detail)
            if stop == StopReason.PREEMPTED:
                return self._preempted(detail)
        return self._finish("completed", 0)

    def _checkpoint(self, *, synchronous: bool = True) -> SaveOutcome | None:
        """Checkpoint the current step; ``None`` when it is being written in the background.

        A checkpoint still in flight is finished (and its outcome taken) first: at most one
        is in flight, and its staging buffers are about to be reused.
        """
        started = time.perf_counter()  # the stall recorded in checkpoint_timings starts here
        self._collect_background(block=True)
        model_state, optim_state = self.stack.state_dicts(self.model, self.optimizer)
        state = pack(model_state=model_state, optim_state=optim_state, step=self.step,
                     scheduler_state=self.scheduler.state_dict(), rank=self.ctx.rank, data_state=self.data.state_dict())
        if synchronous:
            outcome = self.checkpointer.save(state, step=self.step, epoch=self.epoch, started=started)
        else:
            outcome = self.checkpointer.save_async(state, step=self.step, epoch=self.epoch, started=started)
        if outcome is not None:
            self._take(outcome)
        return outcome

    def _take(self, outcome: SaveOutcome) -> None:
        """Learn how a checkpoint ended (rank 0 says so)."""
        if outcome.committed:
            self._saved_step = outcome.step
            self._say(f"checkpoint {outcome.checkpoint_id} committed at step {outcome.step}")
        elif not outcome.fenced:
            self._say(f"checkpoint {outcome.checkpoint_id} aborted: {outcome.reason}", error=True)

    def _collect_background(self, *, block: bool) -> None:
        """Take a background save's outcome if it ended (``block``: wait for it).

        A writer failure found at a step boundary is kept for the stop vote, so every rank
        stops at the same step; when blocking (before another save, at the end) it is raised.
        """
        if self._background_error is not None:
            raise self._background_error
        try:
            outcome = self.checkpointer.wait() if block else self.checkpointer.poll()
        except BackgroundCheckpointError as err:
            self._background_error = err
            if block:
                raise
            return
        if outcome is not None:
            self._take(outcome)

    def _drain_background(self) -> None:
        """After a failure: give the background writer a bounded time to record its end."""
        checkpointer = getattr(self, "checkpointer", None)
        if checkpointer is None or checkpointer.in_flight is None:
            return
        try:
            checkpointer.wait(timeout_s=min(30.0, self.config.dist_timeout_s))
        except BackgroundCheckpointError as err:
            print(f"[ckpt-ledger] {err}", file=sys.stderr, flush=True)

    def _evaluate(self, checkpoint_id: str | None) -> None:
        batches = getattr(self.data, "eval_batches", None)
        if batches is None:
            return
        self.model.eval()
        losses = [self.stack.eval_loss(self.model, x, y, self.loss_fn) for x, y in batches()]
        self.model.train()
        value = all_reduce_mean(torch.stack(losses).mean())
        if self.journal is not None:
            self.journal.metric("eval_loss", value, self.step, checkpoint_id)

    def _agree_to_stop(self) -> tuple[StopReason, int]:
        """Every rank's view of preemption and fencing, reduced: all ranks stop at the same step."""
        received = self.preemption.received
        signum = int(signal.Signals[received]) if received is not None else 0
        fenced_by = self.journal.fenced_by if self.journal is not None and self.journal.fenced_by else 0
        failed = int(self._background_error is not None)
        signum, fenced_by, failed = all_reduce_max([signum, fenced_by, failed], self.ctx.device)
        if failed:  # every rank stops at this boundary, the one whose writer failed says why
            raise self._background_error or BackgroundCheckpointError(
                "a peer's background checkpoint writer failed (its error is in that rank's output)")
        if fenced_by:
            return StopReason.FENCED, fenced_by
        return (StopReason.PREEMPTED if signum else StopReason.NONE), signum

    def _preempted(self, signum: int) -> RunOutcome:
        name = signal.Signals(signum).name
        self._collect_background(block=True)
        if self.journal is not None and self.journal.fenced_by is not None:
            return self._fenced(self.journal.fenced_by)
        if self._saved_step != self.step:
            saved = self._checkpoint()
            if saved.fenced:
                return self._fenced(saved.fenced_by)
            if not saved.committed:
                message = f"preempted by {name} at step {self.step} but the checkpoint failed: {saved.reason}"
                if self.journal is not None:
                    self.journal.end_attempt("failed", self.step)
                return RunOutcome("failed", self.step, EXIT_PROBLEM, message)
        if self.journal is not None:
            self.journal.end_attempt("preempted", self.step, signal_name=name)
        self._say(f"preempted by {name}: saved at step {self.step}, exiting {EXIT_PREEMPTED} (requeue me)")
        return RunOutcome("preempted", self.step, EXIT_PREEMPTED, f"preempted by {name}; state saved at step {self.step}")

    def _fenced(self, fenced_by: int | None) -> RunOutcome:
        message = f"fenced by epoch {fenced_by}: a newer attempt took over this run; this job stops (not restarted)"
        return RunOutcome("fenced", self.step, EXIT_PROBLEM, message)

    def _finish(self, status: str, exit_code: int) -> RunOutcome:
        self._collect_background(block=True)
        if self._saved_step != self.step and self.step > 0:
            saved = self._checkpoint()
            if saved.fenced:
                return self._fenced(saved.fenced_by)
            if not saved.committed:  # "completed" promises a final committed checkpoint: say it failed
                if self.journal is not None:
                    self.journal.end_attempt("failed", self.step)
                return RunOutcome("failed", self.step, EXIT_PROBLEM,
                                  f"the final checkpoint at step {self.step} failed: {saved.reason}")
        if self.journal is not None:
            self.journal.end_attempt(status, self.step)
            if self.journal.fenced_by is not None:  # rank 0 alone learns this; it is the one reporting
                return self._fenced(self.journal.fenced_by)
        return RunOutcome(status, self.step, exit_code)

    # -- odds and ends ----------------------------------------------------------------------------

    def _say(self, message: str, *, error: bool = False) -> None:
        if self.ctx.is_coordinator:
            print(f"[ckpt-ledger] {'error: ' if error else ''}{message}", file=sys.stderr if error else sys.stdout,
                  flush=True)

    def close(self, *, failed: bool = False) -> None:
        """Stop catching signals, release the ledger and leave the process group (if we joined it).

        After a failure the group may be broken (a peer died mid-collective) and destroying it
        could block until the collective timeout, so it is left for process exit.
        """
        if self._owns_watch:
            self.preemption.uninstall()
        self._drain_background()  # the writer uses the journal: it must be done before the journal closes
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if failed or not (self.ctx.owns_group and dist.is_initialized()):
            return
        # Drop everything holding the group (DDP's reducer, the mesh) first, so that the group is
        # freed last, by destroy_process_group: a gloo group freed from DDP's reducer while the GIL
        # is held can deadlock against its own worker threads (pytorch/pytorch#56297).
        self.model = self.optimizer = self.scheduler = self.mesh = self.checkpointer = None  # type: ignore[assignment]
        gc.collect()
        dist.destroy_process_group()
