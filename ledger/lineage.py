"""Lineage: a run is a tree of checkpoints, and the newest attempt is on one branch of it.

Every checkpoint records its ``parent`` when it starts (see :mod:`ledger.projection`):
the previous not-aborted checkpoint of its attempt, or the checkpoint the attempt
resumed from. An attempt that resumed from an older checkpoint (``--resume ID``, or
a fallback past a corrupt one) therefore starts a new branch at that checkpoint.

The *current branch* is the newest attempt's: every checkpoint that attempt started,
plus the checkpoint it resumed from and that checkpoint's ancestors. Resume, latest
and ``keep_last``/``keep_every`` look only at it; everything else is on an abandoned
branch. A log without attempts (a bare API user's) is one branch holding everything.

Everything here is a pure function of the projected :class:`~ledger.projection.State`.
"""

from __future__ import annotations

from ledger.projection import CheckpointState, State


def ancestors(state: State, checkpoint_id: str | None) -> list[CheckpointState]:
    """``checkpoint_id`` and its ancestors, nearest first (empty for ``None`` or an unknown id).

    A parent always started before its child, so the walk ends; the guard only protects
    against a hand-edited state.
    """
    chain: list[CheckpointState] = []
    seen: set[str] = set()
    while checkpoint_id is not None and checkpoint_id not in seen:
        ckpt = state.checkpoints.get(checkpoint_id)
        if ckpt is None:
            break
        seen.add(checkpoint_id)
        chain.append(ckpt)
        checkpoint_id = ckpt.parent
    return chain


def current_branch(state: State) -> set[str] | None:
    """Ids of the checkpoints on the newest attempt's branch; ``None`` when there is no attempt (all are)."""
    attempt = state.attempts.get(state.current_epoch)
    if attempt is None:
        return None
    members = {c.checkpoint_id for c in state.checkpoints.values() if c.epoch == attempt.epoch}
    members.update(c.checkpoint_id for c in ancestors(state, attempt.resumed_from))
    return members


def on_current_branch(state: State, ckpt: CheckpointState, branch: set[str] | None = None) -> bool:
    """Whether ``ckpt`` is on the current branch (pass ``branch`` from :func:`current_branch` in loops)."""
    members = current_branch(state) if branch is None else branch
    return members is None or ckpt.checkpoint_id in members


def branch_point(state: State) -> CheckpointState | None:
    """Where the newest attempt left the line it resumed from: the checkpoint it resumed from, if that
    checkpoint already had a child on another branch (``None`` when nothing was abandoned there)."""
    attempt = state.attempts.get(state.current_epoch)
    if attempt is None or attempt.resumed_from is None:
        return None
    children = [c for c in state.checkpoints.values()
                if c.parent == attempt.resumed_from and c.epoch != attempt.epoch]
    return state.checkpoints.get(attempt.resumed_from) if children else None


def abandoned_reason(state: State, ckpt: CheckpointState) -> str:
    """Why ``ckpt`` is not on the current branch, in words for ``gc --dry-run`` and ``inspect``."""
    attempt = state.attempts.get(state.current_epoch)
    if attempt is None:
        return "abandoned branch"
    if attempt.resumed_from is None:
        return f"abandoned branch (attempt {attempt.epoch} started from scratch)"
    return f"abandoned branch (attempt {attempt.epoch} resumed from {attempt.resumed_from})"
