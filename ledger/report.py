"""Plain-data forms of a projection for ``inspect --json`` and other tools."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ledger import lineage
from ledger.projection import AttemptState, CheckpointState

if TYPE_CHECKING:
    from ledger.view import View


def checkpoint_ref(ckpt: CheckpointState | None) -> dict[str, Any] | None:
    """``{checkpoint_id, step}`` or ``None``."""
    return None if ckpt is None else {"checkpoint_id": ckpt.checkpoint_id, "step": ckpt.step}


def checkpoint_to_dict(ckpt: CheckpointState, on_current_branch: bool = True) -> dict[str, Any]:
    """One entry of ``checkpoints`` in ``inspect --json`` (``on_current_branch``: see :mod:`ledger.lineage`)."""
    return {
        "checkpoint_id": ckpt.checkpoint_id,
        "step": ckpt.step,
        "status": ckpt.status,
        "bytes": ckpt.bytes,
        "shards": len(ckpt.shards),
        "world_size": ckpt.world_size,
        "stack": ckpt.stack,
        "topology": ckpt.topology,
        "epoch": ckpt.epoch,
        "pinned": ckpt.pinned,
        "deletion_requested": ckpt.deletion_requested,
        "deletion_done": ckpt.deletion_done,
        "abort_reason": ckpt.abort_reason,
        "metrics": ckpt.metrics,
        "parent": ckpt.parent,
        "on_current_branch": on_current_branch,
    }


def attempt_to_dict(attempt: AttemptState) -> dict[str, Any]:
    """One entry of ``attempts`` in ``inspect --json``."""
    return {
        "epoch": attempt.epoch,
        "status": attempt.status,
        "reason": attempt.reason,
        "started_at": attempt.started_at,
        "ended_at": attempt.ended_at,
        "resumed_from": attempt.resumed_from,
        "last_step": attempt.last_step,
        "job_id": attempt.job_id,
        "first_step": attempt.first_step,
        "steps_run": attempt.steps_run,
        "steps_lost": attempt.steps_lost,
        "world_size": attempt.world_size,
        "stack": attempt.stack,
        "topology": attempt.topology,
        "host": attempt.host,
        "slurm": attempt.slurm,
        "preempted_by": attempt.preempted_by,
        "fenced_by": attempt.fenced_by,
    }


def view_to_dict(view: "View") -> dict[str, Any]:
    """The JSON object printed by ``ckpt-ledger inspect --json``."""
    run = view.run
    best = view.best
    branch = lineage.current_branch(view.state)
    return {
        "seq": view.seq,
        "run_id": run.run_id if run else None,
        "config_hash": run.config_hash if run else None,
        "code_id": run.code_id if run else None,
        "ledger_version": run.ledger_version if run else None,
        "latest": checkpoint_ref(view.latest),
        "best": None if best is None else {**checkpoint_ref(best.checkpoint), "metric": best.metric, "value": best.value},
        "resume": checkpoint_ref(view.resume),
        "last_step": view.last_step,
        "attempts": [attempt_to_dict(a) for a in view.attempts],
        "checkpoints": [checkpoint_to_dict(c, lineage.on_current_branch(view.state, c, branch))
                        for c in view.checkpoints.values()],
        "aliases": view.aliases,
        "goodput": view.goodput,
        "steps_run": view.state.steps_run,
        "steps_lost": view.state.steps_lost,
        "anomalies": view.anomalies,
    }
