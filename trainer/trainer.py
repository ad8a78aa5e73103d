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
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ledger.faults import crash_point
from trainer.checkpoint_manager import CheckpointManager, unmappable_checkpoint_message  # noqa: F401 - re-exported
from trainer.checkpointing import Checkpointer
from trainer.config import TrainerConfig
from trainer.errors import BadInputError
from trainer.preemption import PreemptionWatch
from trainer.process_group import all_reduce_mean, init_distributed
from trainer.stacks import get_stack
from trainer.train_state import seed_everything, seed_rank


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


def default_optimizer(config: TrainerConfig) -> Callable[[Any], torch.optim.Optimizer]:
    """``optimizer_fn`` by default: AdamW with the config's ``lr`` and ``weight_decay``."""
    return lambda params: torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def default_scheduler(config: TrainerConfig) -> Callable[[torch.optim.Optimizer], Any]:
    """``scheduler_fn`` by default: linear warm-up, then cosine decay to 10% at ``config.steps``."""
    return lambda optimizer: LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.steps))


#: ``step_fn(trainer, inputs, targets) -> detached loss``: one whole optimization step.
StepFn = Callable[["Trainer", torch.Tensor, torch.Tensor], torch.Tensor]


class Trainer:
    """One attempt of a run: set up in the constructor, trained by :meth:`fit`.

    Its checkpoints go through a :class:`~trainer.CheckpointManager` like any user
    loop's. Pluggable: ``optimizer_fn(params)`` and ``scheduler_fn(optimizer)`` (default:
    AdamW and the warm-up cosine schedule), ``step_fn`` or an overridden :meth:`train_step`
    (clipping, accumulation, autocast), and ``shard_units(model)`` choosing the FSDP
    units of ``--stack fsdp`` (default: the entries of ``model.blocks``).
    ``preemption`` is a watch the caller installed earlier (so that a signal arriving
    during setup is not lost); by default the trainer installs its own.
    """

    def __init__(self, config: TrainerConfig, *, model_fn: Callable[[], nn.Module],
                 data_fn: Callable[[int, int, int, torch.device], Any],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 optimizer_fn: Callable[[Any], torch.optim.Optimizer] | None = None,
                 scheduler_fn: Callable[[torch.optim.Optimizer], Any] | None = None,
                 step_fn: StepFn | None = None,
                 shard_units: Callable[[nn.Module], list[nn.Module]] | None = None,
                 preemption: PreemptionWatch | None = None) -> None:
        self.config = config
        self.loss_fn = loss_fn or cross_entropy_loss
        self.optimizer_fn = optimizer_fn or default_optimizer(config)
        self.scheduler_fn = scheduler_fn or default_scheduler(config)
        self.step_fn = step_fn
        self.checkpoints: CheckpointManager | None = None

        # 1. Distributed init: join the process group (gloo on CPU, nccl on CUDA). Signals are
        #    caught from here on: a preemption during setup is acted on at the first step boundary.
        self.ctx = init_distributed(config.dist_timeout_s)
        self._owns_watch = preemption is None
        self.preemption = preemption or PreemptionWatch().install()
        try:
            self._setup(model_fn, data_fn, shard_units)
        except BaseException:
            self.close(failed=True)
            raise

    def _setup(self, model_fn: Callable[[], nn.Module], data_fn: Callable[..., Any],
               shard_units: Callable[[nn.Module], list[nn.Module]] | None) -> None:
        cfg, ctx = self.config, self.ctx

        # 2. Device mesh: the stack validates tp/pp against the world and lays out the ranks.
        self.stack = get_stack(cfg.stack, cfg)
        if shard_units is not None:
            if not hasattr(self.stack, "shard_units"):
                raise BadInputError(f"shard_units= chooses FSDP units; --stack {cfg.stack} does not use it")
            self.stack.shard_units = shard_units
        try:
            self.topology = self.stack.topology(ctx.world_size, tp=cfg.tp, pp=cfg.pp)
        except ValueError as err:
            raise BadInputError(str(err)) from None
        self.mesh = self.stack.build_mesh(self.topology, ctx.device.type)
        dp_rank, dp_size = self.stack.data_parallel_coordinates(self.mesh)
        self._rank_step_point = f"trainer.rank{ctx.rank}.after_step"

        # 3. Seed: the same on every rank, so every rank builds the same initial weights.
        seed_everything(cfg.seed)

        # 4. Model, built on CPU by the job and moved to this rank's device.
        model = model_fn().to(ctx.device)

        # 5. Parallelize with the chosen stack; then give each rank its own random streams (dropout).
        self.model = self.stack.parallelize(model, self.mesh)
        seed_rank(cfg.seed, ctx.rank)

        # 6. Optimizer, LR schedule and this rank's slice of the data.
        self.optimizer = self.optimizer_fn(self.model.parameters())
        self.scheduler = self.scheduler_fn(self.optimizer)
        self.data = data_fn(dp_rank, dp_size, cfg.seed, ctx.device)
        self.state = {"model": self.model, "optim": self.optimizer, "data": self.data}
        if self.scheduler is not None:
            self.state["scheduler"] = self.scheduler

        # 7. The checkpoint manager: records the run, picks the start source (explicit resume >
        #    automatic resume > pretrained > fresh, verifying shard hashes), loads it and begins
        #    the attempt (fencing older ones).
        self.checkpoints = CheckpointManager(
            cfg.run_dir, save_every=cfg.ckpt_every, save_every_seconds=cfg.ckpt_every_seconds,
            keep_last=cfg.keep_last, keep_every=cfg.keep_every, keep_best=cfg.keep_best,
            keep_every_seconds=cfg.keep_every_seconds, keep_for=cfg.keep_for,
            keep_without_metric=cfg.keep_without_metric, best_metric=cfg.best_metric, best_mode=cfg.best_mode,
            async_save=cfg.async_checkpoint, codec=cfg.checkpoint_codec, resume=cfg.resume,
            pretrained=cfg.pretrained, config=cfg.canonical(), log_every=cfg.log_every, stack=cfg.stack,
            topology=self.topology.as_dict(), state_io=self.stack, dist_timeout_s=cfg.dist_timeout_s,
            preemption=self.preemption, blobs=cfg.blobs,
        )
        self.step = self.checkpoints.restore(self.state)
        self.checkpoint_timings = self.checkpoints.timings  # what each checkpoint cost this rank (kept after close)

    @property
    def checkpointer(self) -> Checkpointer | None:
        """The manager's checkpointer (saves, loads, timings)."""
        return self.checkpoints.checkpointer if self.checkpoints is not None else None

    # -- the loop -----------------------------------------------------------------------------------

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimization step on a batch; returns the detached local loss.

        Default: the stack's forward/backward, then optimizer and schedule steps. Override it
        (or pass ``step_fn``) for gradient clipping, accumulation, autocast.
        """
        if self.step_fn is not None:
            return self.step_fn(self, inputs, targets)
        loss = self.stack.train_step(self.model, inputs, targets, self.loss_fn)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def fit(self) -> RunOutcome:
        """Train to ``config.steps``; checkpoint, evaluate, stop early on preemption or fencing."""
        try:
            outcome = self._fit()
        except BaseException:
            self.close(failed=True)
            raise
        self.close()
        return outcome

    def _fit(self) -> RunOutcome:
        cfg, ckpt = self.config, self.checkpoints
        if self.step >= cfg.steps:
            self._say(f"run is already at step {self.step} of {cfg.steps}; nothing to do")
            return self._end()
        self.model.train()
        started, started_step = time.perf_counter(), self.step
        while self.step < cfg.steps:
            inputs, targets = self.data.next_batch()
            loss = self.train_step(inputs, targets)
            self.step += 1
            crash_point("trainer.after_step")
            crash_point(self._rank_step_point)
            metrics = {"loss": float(loss)}
            if self.scheduler is not None and hasattr(self.scheduler, "get_last_lr"):
                metrics["lr"] = self.scheduler.get_last_lr()[0]
            ckpt.log(self.step, **metrics)
            if cfg.print_every and (self.step % cfg.print_every == 0 or self.step == started_step + 1):
                rate = (self.step - started_step) / max(time.perf_counter() - started, 1e-9)
                mean = all_reduce_mean(loss)
                self._say(f"step {self.step}/{cfg.steps}  loss {mean:.4f}  {rate:.1f} steps/s")

            if ckpt.should_save(self.step) or self.step == cfg.steps:
                # The final checkpoint is synchronous: the attempt ends only once it is durable.
                ckpt.save(self.step, self.state, block=self.step == cfg.steps)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self._evaluate()
            if ckpt.should_stop(self.step):
                ckpt.save(self.step, self.state, block=True)  # a no-op when this step was just saved
                return self._end()
        return self._end()

    def _end(self) -> RunOutcome:
        """Make sure the last step is committed (a failed final save is retried once), then end the attempt."""
        ckpt = self.checkpoints
        if self.step > 0 and ckpt.committed_step != self.step:
            ckpt.save(self.step, self.state, block=True)  # waits for it if it is being written; no-op once fenced
        ckpt.close()
        return RunOutcome(ckpt.status, self.step, ckpt.exit_code, ckpt.message)

    def _evaluate(self) -> None:
        batches = getattr(self.data, "eval_batches", None)
        if batches is None:
            return
        self.model.eval()
        losses = [self.stack.eval_loss(self.model, x, y, self.loss_fn) for x, y in batches()]
        self.model.train()
        self.checkpoints.record_metrics(self.step, eval_loss=all_reduce_mean(torch.stack(losses).mean()))

    # -- odds and ends ----------------------------------------------------------------------------

    def _say(self, message: str, *, error: bool = False) -> None:
        if self.ctx.is_coordinator:
            print(f"[ckpt-ledger] {'error: ' if error else ''}{message}", file=sys.stderr if error else sys.stdout,
                  flush=True)

    def close(self, *, failed: bool = False) -> None:
        """End the attempt (if still open), stop catching signals and leave the process group (if we joined it).

        After a failure the group may be broken (a peer died mid-collective) and destroying it
        could block until the collective timeout, so it is left for process exit.
        """
        if self.checkpoints is not None:
            self.checkpoints.close(failed=failed)
        if self._owns_watch:
            self.preemption.uninstall()
        if failed or not (self.ctx.owns_group and dist.is_initialized()):
            return
        # Drop everything holding the group (DDP's reducer, the mesh) first, so that the group is
        # freed last, by destroy_process_group: a gloo group freed from DDP's reducer while the GIL
        # is held can deadlock against its own worker threads (pytorch/pytorch#56297).
        self.model = self.optimizer = self.scheduler = self.mesh = self.state = None  # type: ignore[assignment]
        self.checkpoints = None
        gc.collect()
        dist.destroy_process_group()
