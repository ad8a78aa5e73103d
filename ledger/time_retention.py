"""Time-based retention rules, as pure functions of the projected state and a given ``now``.

Commit times are the ``recorded_at`` of each ``checkpoint.committed`` (wall clock,
informational elsewhere; here the rule is about wall-clock age by definition). The
caller passes ``now`` (``gc`` and the trainer pass the clock; tests pass a number), so
the decision stays a pure function of its inputs and ``gc --dry-run`` shows exactly
what ``gc`` would do at that moment.
"""

from __future__ import annotations

import math
import re

from ledger.projection import CheckpointState, State

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(value: str | float | int, *, name: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``6h``, ``7d`` or ``2w`` (numbers are seconds).

    Raises ``ValueError`` naming ``name`` for anything else or a non-positive duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a duration such as 3600, 30m, 6h or 7d, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"{name} must be a duration such as 3600, 30m, 6h or 7d, got {value!r}")
        seconds = float(match[1]) * _UNITS[match[2] or "s"]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a positive duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``5400`` -> ``1.5h``; the largest unit that gives a short number."""
    for unit in ("w", "d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size:
            return f"{seconds / size:.3g}{unit}"
    return f"{seconds:.3g}s"


def kept_by_age(checkpoints: list[CheckpointState], keep_for: float, now: float) -> dict[str, str]:
    """Checkpoints committed less than ``keep_for`` seconds before ``now``, with why."""
    return {c.checkpoint_id: f"keep-for {format_duration(keep_for)} (committed {format_duration(max(0.0, now - c.committed_at))} ago)"
            for c in checkpoints if c.committed_at is not None and now - c.committed_at < keep_for}


def kept_by_interval(checkpoints: list[CheckpointState], every: float) -> dict[str, str]:
    """The first checkpoint committed in each ``every``-second window of the wall clock, with why."""
    first: dict[int, CheckpointState] = {}
    for ckpt in sorted((c for c in checkpoints if c.committed_at is not None),
                       key=lambda c: (c.committed_at, c.committed_seq or 0)):
        first.setdefault(int(ckpt.committed_at // every), ckpt)
    return {c.checkpoint_id: f"keep-every-seconds {format_duration(every)} (first of its window)"
            for c in first.values()}


def time_keeps(state: State, checkpoints: list[CheckpointState], *, keep_for: float | None,
               keep_every_seconds: float | None, now: float | None) -> dict[str, str]:
    """What the time rules keep among ``checkpoints`` (``now`` defaults to the newest commit time known)."""
    keep: dict[str, str] = {}
    if keep_every_seconds is not None:
        keep.update(kept_by_interval(checkpoints, keep_every_seconds))
    if keep_for is not None:
        if now is None:
            now = max((c.committed_at for c in state.checkpoints.values() if c.committed_at is not None), default=0.0)
        for checkpoint_id, why in kept_by_age(checkpoints, keep_for, now).items():
            keep.setdefault(checkpoint_id, why)
    return keep
