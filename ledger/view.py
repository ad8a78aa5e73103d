"""The read-side face of a projection: what ``Ledger.projection()`` returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ledger import decisions
from ledger.errors import CheckpointNotFoundError
from ledger.projection import AttemptState, CheckpointState, RunInfo, State


@dataclass(frozen=True, slots=True)
class BestCheckpoint:
    """The best checkpoint and the metric that made it so."""

    checkpoint: CheckpointState
    metric: str
    value: float

    @property
    def checkpoint_id(self) -> str:
        return self.checkpoint.checkpoint_id

    @property
    def step(self) -> int:
        return self.checkpoint.step


class View:
    """An immutable-by-convention view of the run as of log sequence ``seq``.

    The view owns its state (nobody else folds into it), so it never changes
    after it is returned.
    """

    def __init__(self, state: State, rule: decisions.BestRule | None = None) -> None:
        self._state = state
        self._rule = rule or decisions.BestRule.of(state)

    @property
    def state(self) -> State:
        """The raw projected state (treat as read-only)."""
        return self._state

    @property
    def seq(self) -> int:
        """The last sequence number folded into this view."""
        return self._state.seq

    @property
    def run(self) -> RunInfo | None:
        """Run identity from ``run.started`` (``None`` before it)."""
        return self._state.run

    @property
    def checkpoints(self) -> dict[str, CheckpointState]:
        """Every checkpoint ever started, in the order they started."""
        return self._state.checkpoints

    @property
    def attempts(self) -> list[AttemptState]:
        """Every attempt, oldest first."""
        return [self._state.attempts[e] for e in sorted(self._state.attempts)]

    @property
    def resume(self) -> CheckpointState | None:
        """What a restart would load."""
        return decisions.resume_target(self._state)

    @property
    def latest(self) -> CheckpointState | None:
        """The most recently committed usable checkpoint."""
        return decisions.latest(self._state)

    @property
    def best(self) -> BestCheckpoint | None:
        """The best usable checkpoint by the run's metric rule."""
        found = decisions.best(self._state, self._rule)
        return BestCheckpoint(found[0], self._rule.metric, found[1]) if found else None

    @property
    def aliases(self) -> dict[str, str]:
        """Every alias (``latest``/``best`` as last recorded, and user names) -> checkpoint id."""
        return dict(self._state.aliases)

    @property
    def best_rule(self) -> decisions.BestRule:
        return self._rule

    @property
    def last_step(self) -> int | None:
        """The step of the newest ``step.completed`` (or the resumed step after a restart)."""
        return self._state.last_step

    @property
    def goodput(self) -> float:
        """Fraction of step work not lost to restarts."""
        return decisions.goodput(self._state)

    @property
    def anomalies(self) -> list[str]:
        """Protocol violations seen in the log (for audit)."""
        return list(self._state.anomalies)

    def resume_candidates(self) -> list[CheckpointState]:
        """Usable checkpoints, best resume choice first (fallbacks after corruption follow)."""
        return decisions.resume_candidates(self._state)

    def protected(self) -> dict[str, str]:
        """Checkpoints retention must keep, with the reason."""
        return decisions.protected(self._state, self._rule)

    def checkpoint(self, ref: str) -> CheckpointState:
        """Look up ``latest``, ``best``, a user alias or a checkpoint id."""
        if ref == "latest":
            found = self.latest
        elif ref == "best":
            best = self.best
            found = best.checkpoint if best else None
        elif ref in self._state.checkpoints:
            found = self._state.checkpoints[ref]
        elif ref in self._state.aliases:
            found = self._state.checkpoints.get(self._state.aliases[ref])
        else:
            found = None
        if found is None:
            known = ", ".join(list(self._state.checkpoints)[-5:]) or "none"
            raise CheckpointNotFoundError(
                f"no checkpoint {ref!r} in this run (recent checkpoints: {known}); "
                "see `ckpt-ledger inspect` for the full list"
            )
        return found

    def to_dict(self) -> dict[str, Any]:
        """The JSON form printed by ``ckpt-ledger inspect --json``."""
        from ledger.report import view_to_dict

        return view_to_dict(self)
