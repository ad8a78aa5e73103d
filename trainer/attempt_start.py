"""How a ``CheckpointManager`` attempt starts: rank 0 records the run, the start is loaded, the attempt begun.

:meth:`trainer.CheckpointManager.restore` runs these steps in order (the choice of what
to start from — explicit ``resume=``, automatic resume, ``pretrained=``, fresh — is
:func:`trainer.sources.choose_start`'s):

1. rank 0 opens the ledger and records ``run.started`` once per run
   (:func:`record_run_started`), and reads where the run keeps its blobs
   (:func:`recorded_blobs`);
2. every rank loads the chosen start into the user's state (:func:`load_start`);
3. rank 0 records ``attempt.started`` (fencing older attempts) and any corruption
   verification found; every rank learns the epoch (:func:`begin_attempt`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ledger import RetentionPolicy
from ledger.run_address import is_database_url, parse_run_address
from trainer.checkpoint_state import StateDictIO, TrainingState, restore_checkpoint
from trainer.checkpointing import Candidate, Checkpointer
from trainer.errors import BadInputError
from trainer.identity import config_hash, ledger_version, user_code_id
from trainer.pretrained import read_pretrained
from trainer.process_group import DistContext, broadcast_object, slurm_facts
from trainer.recorder import Recorder
from trainer.run_recorder import RunRecorder
from trainer.sources import StartPlan

#: ``say(message, error=False)``: a progress line for the user (printed on rank 0 only).
Say = Callable[..., None]


def detect_stack(state: TrainingState) -> str:
    """The label recorded for a user's loop: ``fsdp`` when a module is FSDP2-sharded, else ``ddp``."""
    from torch.distributed.fsdp import FSDPModule

    sharded = any(isinstance(m, FSDPModule) for module in state.modules.values() for m in module.modules())
    return "fsdp" if sharded else "ddp"


# -- 1. the run (rank 0) ----------------------------------------------------------------------------

def policy_config(retention: RetentionPolicy, best_metric: str, best_mode: str) -> dict[str, Any]:
    """The fields the ledger's decisions read from ``run.started`` (best rule, retention for gc)."""
    policy = {name: getattr(retention, name) for name in retention.__dataclass_fields__}
    return {**policy, "best_metric": best_metric, "best_mode": best_mode}


def record_run_started(writer: RunRecorder, *, run_dir: str, blobs: str | None, config: dict[str, Any],
                       say: Say) -> None:
    """Rank 0: record ``run.started`` with ``config`` (once per run; a differing config is noted, not refused).

    A run in a database has no directory for its shards: its first start must say where (``blobs``).
    """
    if blobs is None and is_database_url(run_dir) and not writer.ledger.events(tags=["run.started"]):
        raise BadInputError(f"{parse_run_address(run_dir)} is a run in a database, which has no directory "
                            "for checkpoint files: give it one with --blobs DIR|s3://BUCKET/PREFIX (blobs=)")
    _, same = writer.start_run(config, config_hash(config), user_code_id(), blobs=blobs,
                               ledger_version=ledger_version())
    if not same:
        say("note: this config differs from the one the run started with (see run.started)")


def recorded_blobs(writer: RunRecorder, asked: str | None) -> tuple[str | None, str | None]:
    """Rank 0: ``(blob URL run.started recorded, error)``: asking for another place than the recorded one is an
    error."""
    recorded = writer.blobs.url
    if asked is not None and asked.rstrip("/") != (recorded or "").rstrip("/"):
        return recorded, (f"this run keeps its checkpoints in {recorded or 'the run directory'} (recorded in "
                          f"run.started), not {asked}; drop blobs=/--blobs to use the recorded place")
    return recorded, None


# -- 2. the start (every rank) ----------------------------------------------------------------------

def load_start(plan: StartPlan, entries: TrainingState, checkpointer: Checkpointer, state_io: StateDictIO, *,
               ctx: DistContext, stack: str, topology: dict[str, int], say: Say) -> int:
    """Load what ``plan`` starts from into the user's state (collective); the step it is at (0: fresh)."""
    if plan.candidate is not None:
        return _resume(plan.candidate, entries, checkpointer, state_io, ctx=ctx, stack=stack, topology=topology,
                       say=say)
    if plan.pretrained is not None:
        weights = read_pretrained(plan.pretrained)
        try:
            state_io.load_full_model_state(entries.only_module("pretrained="), weights)
        except (RuntimeError, KeyError, ValueError) as err:
            raise BadInputError(f"pretrained {plan.pretrained}: does not fit the model "
                                f"({' '.join(str(err).split())[:200]})") from None
        say(f"initialised model weights from {plan.pretrained} (optimizer, schedule and step start fresh)")
    return 0


def _resume(candidate: Candidate, entries: TrainingState, checkpointer: Checkpointer, state_io: StateDictIO, *,
            ctx: DistContext, stack: str, topology: dict[str, int], say: Say) -> int:
    step = restore_checkpoint(entries, state_io, checkpointer, candidate, rank=ctx.rank,
                              layout=(stack, ctx.world_size, topology))
    if candidate.world_size != ctx.world_size:
        say(f"world size changed {candidate.world_size} -> {ctx.world_size}: "
            "resumed, but not bitwise-comparable with an unchanged run")
    say(f"resumed from {candidate.checkpoint_id} at step {step}")
    return step


# -- 3. the attempt ---------------------------------------------------------------------------------

def begin_attempt(recorder: Recorder, plan: StartPlan, *, ctx: DistContext, stack: str, topology: dict[str, int],
                  say: Say) -> int:
    """Rank 0 records the attempt and any corruption found; every rank learns the epoch (collective)."""
    candidate = plan.candidate
    previous = None if candidate is None else {
        "world_size": candidate.world_size, "stack": candidate.stack, **candidate.topology}
    epoch = recorder.begin_attempt(
        world_size=ctx.world_size, stack=stack, topology=topology,
        resumed_from=candidate.checkpoint_id if candidate else None, slurm=slurm_facts(os.environ),
        previous_topology=previous,
    )
    report_corruption(recorder, plan, say)
    return broadcast_object(epoch)


def report_corruption(recorder: Recorder, plan: StartPlan, say: Say) -> None:
    """Record each shard verification found bad (``corruption.detected``; rank 0's recorder)."""
    for bad in plan.bad_shards:
        recorder.report_corruption(bad.checkpoint_id, bad.location, bad.expected_hash, bad.found_hash)
        say(f"corruption: {bad.detail}; checkpoint {bad.checkpoint_id} will not be loaded")
