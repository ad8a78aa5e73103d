"""Every decision the ledger makes, as a pure function of the projected state.

Nothing here reads a file, a directory or the clock. Ordering is by step and log
sequence only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ledger import lineage
from ledger.projection import CheckpointState, State
from ledger.statuses import AttemptStatus, CheckpointStatus

DEFAULT_BEST_METRIC = "eval_loss"
DEFAULT_BEST_MODE = "min"


@dataclass(frozen=True, slots=True)
class BestRule:
    """Which metric ranks checkpoints for ``best``, and whether lower or higher wins."""

    metric: str = DEFAULT_BEST_METRIC
    mode: str = DEFAULT_BEST_MODE

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"best mode must be 'min' or 'max', got {self.mode!r}")

    @classmethod
    def of(cls, state: State) -> BestRule:
        """The rule recorded in the run's config (``best_metric``, ``best_mode``), else the default."""
        config = state.run.config if state.run is not None else {}
        return cls(metric=str(config.get("best_metric", DEFAULT_BEST_METRIC)), mode=str(config.get("best_mode", DEFAULT_BEST_MODE)))


def usable_on_branch(state: State) -> list[CheckpointState]:
    """Usable checkpoints on the current branch (see :mod:`ledger.lineage`), in start order."""
    branch = lineage.current_branch(state)
    return [c for c in state.checkpoints.values() if c.usable and (branch is None or c.checkpoint_id in branch)]


def resume_candidates(state: State) -> list[CheckpointState]:
    """Usable checkpoints on the current branch, best resume choice first: highest step, then latest commit.

    Falling back past the first one walks back along the branch's ancestors, never onto another branch.
    """
    return sorted(usable_on_branch(state), key=lambda c: (c.step, c.committed_seq or 0), reverse=True)


def resume_target(state: State) -> CheckpointState | None:
    """What a restart loads: the newest (highest-step) usable checkpoint on the current branch."""
    candidates = resume_candidates(state)
    return candidates[0] if candidates else None


def latest(state: State) -> CheckpointState | None:
    """The head of the current branch: its most recently committed usable checkpoint (by log sequence)."""
    return max(usable_on_branch(state), key=lambda c: c.committed_seq or 0, default=None)


def metric_of(state: State, ckpt: CheckpointState, metric: str) -> float | None:
    """The checkpoint's value of ``metric``: recorded against it, else recorded at its step."""
    if metric in ckpt.metrics:
        return ckpt.metrics[metric]
    return state.metrics_by_step.get(ckpt.step, {}).get(metric)


def _scored(state: State, rule: BestRule) -> list[tuple[CheckpointState, float]]:
    scored = []
    for ckpt in state.checkpoints.values():
        value = metric_of(state, ckpt, rule.metric) if ckpt.usable else None
        if value is not None:
            scored.append((ckpt, value))
    return scored


def _rank_key(rule: BestRule) -> Callable[[tuple[CheckpointState, float]], tuple[float, int, int]]:
    sign = 1.0 if rule.mode == "min" else -1.0
    return lambda cv: (sign * cv[1], -cv[0].step, -(cv[0].committed_seq or 0))


def ranked_by_metric(state: State, rule: BestRule) -> list[tuple[CheckpointState, float]]:
    """Usable checkpoints that have the metric, best first (ties: the later step wins)."""
    return sorted(_scored(state, rule), key=_rank_key(rule))


def best(state: State, rule: BestRule | None = None) -> tuple[CheckpointState, float] | None:
    """The best usable checkpoint by ``rule`` and its metric value (a late metric still counts).

    The first of :func:`ranked_by_metric`, found without sorting: the writer decides this on
    every checkpoint append, so at 10k checkpoints the sort showed.
    """
    rule = rule or BestRule.of(state)
    return min(_scored(state, rule), key=_rank_key(rule), default=None)


def is_torn(state: State, ckpt: CheckpointState) -> bool:
    """In flight from an attempt that is over or fenced: it can never be committed."""
    if ckpt.status != CheckpointStatus.IN_FLIGHT:
        return False
    attempt = state.attempts.get(ckpt.epoch)
    ended = attempt is not None and attempt.status != AttemptStatus.RUNNING
    return ckpt.epoch < state.current_epoch or ended


def goodput(state: State) -> float:
    """Fraction of executed step work not lost to restarts (1.0 before any step)."""
    if state.steps_run <= 0:
        return 1.0
    return max(0.0, (state.steps_run - state.steps_lost) / state.steps_run)


def protected(state: State, rule: BestRule | None = None) -> dict[str, str]:
    """Checkpoints retention must never remove, with why: latest, best, resume, pinned, in flight, aliased."""
    keep: dict[str, str] = {}
    for ckpt in state.checkpoints.values():
        if ckpt.status == CheckpointStatus.IN_FLIGHT and not is_torn(state, ckpt):
            keep[ckpt.checkpoint_id] = "in flight"
        elif ckpt.pinned and ckpt.status != CheckpointStatus.DELETED:
            keep[ckpt.checkpoint_id] = "pinned"
    for alias, checkpoint_id in state.aliases.items():
        if alias not in ("latest", "best"):
            keep.setdefault(checkpoint_id, f"alias {alias}")
    if (target := resume_target(state)) is not None:
        keep.setdefault(target.checkpoint_id, "resume target")
    if (newest := latest(state)) is not None:
        keep.setdefault(newest.checkpoint_id, "latest")
    if (top := best(state, rule)) is not None:
        keep.setdefault(top[0].checkpoint_id, "best")
    return keep


#: Aliases the ledger itself maintains; every other name is a user's (``ckpt-ledger alias``).
SYSTEM_ALIASES = ("latest", "best")


def alias_updates(wanted: dict[str, CheckpointState | None], recorded: dict[str, str]
                  ) -> list[tuple[str, CheckpointState | None]]:
    """``(alias, checkpoint or None)`` for each system alias whose recorded ``alias.promoted`` no longer
    matches the decision in ``wanted`` (``None``: remove it). Writers append these so that
    ``replay --kind alias.promoted`` shows the history; decisions never read them back."""
    updates = []
    for alias in SYSTEM_ALIASES:
        target = wanted.get(alias)
        if (target.checkpoint_id if target is not None else None) != recorded.get(alias):
            updates.append((alias, target))
    return updates
