"""Where an attempt starts from: explicit ``--resume`` > automatic resume > ``--pretrained`` > fresh.

* An explicitly requested checkpoint (an id, ``latest`` or ``best``) must exist, be
  committed and verify; anything else is an error, never a silent fresh start.
* Otherwise the projection's resume candidates are tried best first; a candidate
  whose shards do not verify is reported (``corruption.detected``) and the next one
  is tried.
* Only a run whose ledger has never committed a checkpoint starts without one:
  from ``--pretrained`` weights if given, else from the seeded initialisation.

The explicit ``--resume`` only applies to the first attempt of a launch. A restart by
the launcher (``--max-restarts``) or a SLURM requeue re-runs the same command line, and
must continue from the newest checkpoint, not go back to the one named at submission.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from ledger import CheckpointNotFoundError, View
from ledger.statuses import CheckpointStatus
from trainer.checkpointing import BadShard, Candidate, Checkpointer
from trainer.errors import StartRefusedError
from trainer.process_group import broadcast_object


@dataclass(frozen=True, slots=True)
class StartPlan:
    """What this attempt starts from, the same on every rank."""

    candidate: Candidate | None
    """The verified checkpoint to resume, or ``None``."""
    pretrained: str | None
    """Model-only weights to load when nothing is resumed."""
    bad_shards: tuple[BadShard, ...]
    """Shards found corrupt while choosing (recorded once the attempt has begun)."""
    explicit: bool
    """Whether ``candidate`` was requested by ``--resume``."""
    error: str | None = None
    """Why the attempt must not start (after ``bad_shards`` are recorded)."""


def is_first_launch_attempt(env: Mapping[str, str]) -> bool:
    """Not a restart by the elastic agent and not a SLURM requeue."""
    return int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0 and int(env.get("SLURM_RESTART_COUNT", "0") or 0) == 0


def resume_candidates(view: View, resume: str | None) -> tuple[list[Candidate], bool]:
    """The checkpoints to try, best first, and whether they were explicitly requested.

    Raises :class:`StartRefusedError` for an explicit reference that is unknown or not loadable.
    """
    if resume is not None:
        try:
            ckpt = view.checkpoint(resume)
        except CheckpointNotFoundError as err:
            raise StartRefusedError(f"--resume {resume}: {err}") from None
        if not ckpt.usable:
            state = ("being deleted" if ckpt.deletion_requested and ckpt.status == CheckpointStatus.COMMITTED
                     else ckpt.status)
            raise StartRefusedError(
                f"--resume {resume}: checkpoint {ckpt.checkpoint_id} (step {ckpt.step}) is {state}, not loadable; "
                "pick a committed one from `ckpt-ledger inspect`"
            )
        return [Candidate.of(ckpt)], True
    return [Candidate.of(c) for c in view.resume_candidates()], False


def fresh_start_refusal(view: View) -> str | None:
    """Why starting from scratch would be wrong: the ledger has committed checkpoints, none loadable."""
    committed = [c for c in view.checkpoints.values() if c.committed_seq is not None]
    if not committed or view.resume_candidates():
        return None
    elsewhere = [c for c in committed if c.usable]  # usable, but on an abandoned branch (see ledger.lineage)
    if elsewhere:
        newest = max(elsewhere, key=lambda c: (c.step, c.committed_seq or 0))
        return (
            f"no checkpoint on the current branch can be loaded, and a restart never jumps to another branch; "
            f"{len(elsewhere)} usable checkpoint(s) are on abandoned branches, e.g. {newest.checkpoint_id} (step "
            f"{newest.step}): resume one explicitly with --resume ID, or use a new --run-dir"
        )
    states = ", ".join(f"{c.checkpoint_id} {c.status}" for c in committed[-5:])
    return (
        f"the ledger has {len(committed)} committed checkpoint(s) but none can be loaded ({states}); "
        "refusing to start from scratch — use a new --run-dir to start over"
    )


def choose_start(checkpointer: Checkpointer, view: View | None, *, resume: str | None,
                 pretrained: str | None) -> StartPlan:
    """Pick and verify the start source (collective; ``view`` is given on rank 0 only)."""
    decision: tuple[list[Candidate], bool, str | None] | None = None
    if view is not None:
        try:
            candidates, explicit = resume_candidates(view, resume)
            decision = (candidates, explicit, None if candidates else fresh_start_refusal(view))
        except StartRefusedError as err:
            decision = ([], True, str(err))
    candidates, explicit, refusal = broadcast_object(decision)
    if refusal is not None:
        return StartPlan(None, None, (), explicit, error=refusal)

    bad: list[BadShard] = []
    for candidate in candidates:
        found = checkpointer.verify(candidate)
        if not found:
            return StartPlan(candidate, None, tuple(bad), explicit)
        bad.extend(found)
        if explicit:
            return StartPlan(None, None, tuple(bad), explicit, error=(
                f"--resume: checkpoint {candidate.checkpoint_id} failed verification ({found[0].detail}); "
                "it was marked corrupt — resume from another checkpoint"))
    if candidates:
        return StartPlan(None, None, tuple(bad), explicit, error=(
            f"none of the {len(candidates)} committed checkpoint(s) verifies (first problem: {bad[0].detail}); "
            "refusing to start from scratch — use a new --run-dir to start over"))
    return StartPlan(None, pretrained, (), explicit)


def honoured_resume(resume: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """``resume`` on the first attempt of a launch; ``None`` (automatic resume) on restarts and requeues."""
    return resume if resume is not None and is_first_launch_attempt(env if env is not None else os.environ) else None
