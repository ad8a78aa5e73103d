"""Retention: which checkpoints to delete (a pure plan), and deleting them crash-safely.

The plan is a pure function of the projected state and a policy. It never lists
a protected checkpoint (latest, best, resume target, pinned, in flight, aliased).
Execution appends ``checkpoint.deletion_requested`` before touching any blob and
``checkpoint.deleted`` after the last one is gone; a deletion interrupted by a
crash shows up in the next plan as "finish interrupted deletion", so re-running
always finishes the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ledger import decisions, lineage
from ledger.faults import crash_point
from ledger.projection import State
from ledger.statuses import CheckpointStatus
from ledger.time_retention import format_duration, parse_duration, time_keeps

if TYPE_CHECKING:
    from ledger.ledger import Ledger


#: Rules that count checkpoints or steps, and rules about wall-clock time.
_COUNT_RULES = ("keep_last", "keep_every", "keep_best")
_TIME_RULES = ("keep_every_seconds", "keep_for")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionPolicy:
    """Which committed checkpoints to keep. ``None`` disables a rule; all ``None`` keeps everything.

    A checkpoint is kept when any rule keeps it (or it is protected: latest, best, resume
    target, pinned, in flight, aliased); every other committed checkpoint is deleted.
    """

    keep_last: int | None = None
    """Keep the K highest-step committed checkpoints of the current branch."""
    keep_every: int | None = None
    """Keep checkpoints of the current branch whose step is a multiple of N (archival)."""
    keep_best: int | None = None
    """Keep the K best checkpoints by the run's metric rule."""
    keep_every_seconds: float | None = None
    """Keep the first checkpoint committed in each window of this many wall-clock seconds (archival by time).
    Durations may also be given as text: ``30m``, ``6h``, ``7d``."""
    keep_for: float | None = None
    """Keep every checkpoint committed less than this many seconds ago (a TTL: older ones go unless another
    rule keeps them)."""
    keep_without_metric: bool = False
    """With ``keep_best``: also keep checkpoints that have no value of the metric. By default ``keep_best``
    ranks only checkpoints that have one and keeps none of the others."""

    def __post_init__(self) -> None:
        for name in _COUNT_RULES:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < (1 if name == "keep_every" else 0)):
                raise ValueError(f"{name} must be a {'positive' if name == 'keep_every' else 'non-negative'} integer, got {value!r}")
        for name in _TIME_RULES:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_duration(value, name=name))
        if not isinstance(self.keep_without_metric, bool):
            raise ValueError(f"keep_without_metric must be True or False, got {self.keep_without_metric!r}")

    @property
    def active(self) -> bool:
        """Whether any rule is set (an inactive policy deletes nothing)."""
        return any(getattr(self, name) is not None for name in (*_COUNT_RULES, *_TIME_RULES))

    @classmethod
    def from_config(cls, config: dict) -> "RetentionPolicy":
        """The policy recorded in a run's config (``keep_last``, ``keep_every``, ``keep_best``, time rules)."""
        fields = {k: config.get(k) for k in (*_COUNT_RULES, *_TIME_RULES)}
        return cls(**fields, keep_without_metric=bool(config.get("keep_without_metric", False)))

    def as_dict(self) -> dict:
        """Every rule by name (the form ``gc --json`` prints and ``run.started`` records)."""
        return {name: getattr(self, name) for name in (*_COUNT_RULES, *_TIME_RULES, "keep_without_metric")}

    def describe(self) -> str:
        parts = [f"{k.replace('_', '-')} {v}" for k, v in
                 (("keep_last", self.keep_last), ("keep_every", self.keep_every), ("keep_best", self.keep_best)) if v is not None]
        parts += [f"{k.replace('_', '-')} {format_duration(v)}" for k, v in
                  (("keep_every_seconds", self.keep_every_seconds), ("keep_for", self.keep_for)) if v is not None]
        if self.keep_best is not None and self.keep_without_metric:
            parts.append("keep-without-metric")
        return ", ".join(parts) or "keep everything"


@dataclass(frozen=True, slots=True)
class Deletion:
    """One planned deletion and why."""

    checkpoint_id: str
    step: int
    reason: str
    locations: tuple[str, ...]
    bytes: int


def plan(state: State, policy: RetentionPolicy, rule: decisions.BestRule | None = None, *,
         now: float | None = None) -> list[Deletion]:
    """The checkpoints ``policy`` would delete at time ``now``, with reasons. Pure; never includes a protected one.

    ``now`` only matters to ``keep_for`` (default: the newest commit time in ``state``).
    """
    deletions: list[Deletion] = []
    keep = decisions.protected(state, rule)
    for ckpt in state.checkpoints.values():
        if ckpt.deletion_requested and not ckpt.deletion_done:
            deletions.append(_deletion(ckpt, f"finish interrupted deletion ({ckpt.deletion_reason or 'no reason'})"))
        elif decisions.is_torn(state, ckpt) and ckpt.checkpoint_id not in keep:  # a pin or user alias still keeps it
            deletions.append(_deletion(ckpt, f"torn save of attempt {ckpt.epoch}: never committed"))
        elif ckpt.status == CheckpointStatus.ABORTED and ckpt.shards and ckpt.checkpoint_id not in keep:
            # Without this an aborted save's recorded shards would stay on disk forever (one with
            # none recorded has nothing to delete: it stays "aborted" in the record).
            deletions.append(_deletion(ckpt, f"aborted ({ckpt.abort_reason or 'no reason'}): never committed"))
    if not policy.active:
        return deletions
    committed = [c for c in state.checkpoints.values()
                 if c.status in (CheckpointStatus.COMMITTED, CheckpointStatus.CORRUPT) and not c.deletion_requested]
    by_step = sorted(committed, key=lambda c: (c.step, c.committed_seq or 0), reverse=True)
    # keep-last and keep-every count along the current branch only; an abandoned branch is
    # kept by pins, aliases, best or keep-best (see ledger.lineage).
    branch = lineage.current_branch(state)
    on_branch = [c for c in by_step if branch is None or c.checkpoint_id in branch]
    if policy.keep_last is not None:
        for ckpt in on_branch[: policy.keep_last]:
            keep.setdefault(ckpt.checkpoint_id, f"keep-last {policy.keep_last}")
    if policy.keep_every is not None:
        for ckpt in on_branch:
            if ckpt.step % policy.keep_every == 0:
                keep.setdefault(ckpt.checkpoint_id, f"keep-every {policy.keep_every}")
    unscored: set[str] = set()
    if policy.keep_best is not None:
        best_rule = rule or decisions.BestRule.of(state)
        ranked = decisions.ranked_by_metric(state, best_rule)
        for ckpt, _ in ranked[: policy.keep_best]:
            keep.setdefault(ckpt.checkpoint_id, f"keep-best {policy.keep_best}")
        scored = {ckpt.checkpoint_id for ckpt, _ in ranked}
        unscored = {c.checkpoint_id for c in committed if c.checkpoint_id not in scored}
        if policy.keep_without_metric:
            for checkpoint_id in sorted(unscored):
                keep.setdefault(checkpoint_id, f"keep-without-metric (no {best_rule.metric})")
    for checkpoint_id, why in time_keeps(state, committed, keep_for=policy.keep_for,
                                         keep_every_seconds=policy.keep_every_seconds, now=now).items():
        keep.setdefault(checkpoint_id, why)
    for ckpt in by_step:
        if ckpt.checkpoint_id not in keep:
            if ckpt.status == CheckpointStatus.CORRUPT:
                why = "corrupt and not kept"
            elif branch is not None and ckpt.checkpoint_id not in branch:
                why = lineage.abandoned_reason(state, ckpt)
            elif ckpt.checkpoint_id in unscored:
                why = f"not kept by policy ({policy.describe()}); has no {(rule or decisions.BestRule.of(state)).metric}, so keep-best cannot rank it"
            else:
                why = f"not kept by policy ({policy.describe()})"
            deletions.append(_deletion(ckpt, why))
    return deletions


def _deletion(ckpt, reason: str) -> Deletion:
    return Deletion(
        checkpoint_id=ckpt.checkpoint_id,
        step=ckpt.step,
        reason=reason,
        locations=tuple(s.location for s in ckpt.shards),
        bytes=ckpt.bytes,
    )


def execute(ledger: "Ledger", deletions: list[Deletion], *, epoch: int) -> list[Deletion]:
    """Carry out a plan: request, remove blobs, confirm — each step safe to repeat after a crash."""
    from ledger.events import CheckpointDeleted, CheckpointDeletionRequested

    done = []
    for item in deletions:
        ledger.append(
            CheckpointDeletionRequested(checkpoint_id=item.checkpoint_id, reason=item.reason),
            epoch=epoch,
            event_id=f"{item.checkpoint_id}:deletion_requested",
        )
        crash_point("retention.after_deletion_requested")
        for location in item.locations:
            ledger.blobs.delete(location)
            crash_point("retention.after_blob_removed")
        ledger.append(CheckpointDeleted(checkpoint_id=item.checkpoint_id), epoch=epoch, event_id=f"{item.checkpoint_id}:deleted")
        crash_point("retention.after_deleted")
        done.append(item)
    return done
