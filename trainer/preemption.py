"""Preemption: a signal only sets a flag; ranks agree at each step boundary on whether to stop.

Schedulers ask a job to stop with SIGTERM (``scancel``, SLURM's grace period) or a
configured SIGUSR1. Doing real work inside a signal handler is unsafe (it runs between
arbitrary bytecodes, possibly inside a collective), so the handler records the signal
and the training loop acts on it at the next step boundary, where every rank is at the
same step. The signal may reach some ranks and not others (or arrive a step apart),
so the decision is an all-reduce of each rank's local view: any rank's stop is every
rank's stop, at the same step.
"""

from __future__ import annotations

import signal
import threading
from enum import IntEnum
from types import FrameType
from typing import Any

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class StopReason(IntEnum):
    """Why the loop stops early, ordered so that the all-reduced maximum is the one to act on."""

    NONE = 0
    PREEMPTED = 1
    FENCED = 2


class PreemptionWatch:
    """Catches SIGTERM/SIGUSR1 and remembers the first one, until :meth:`uninstall`.

    ``chain=True`` also calls whatever handler was installed before (a framework's own,
    e.g. Lightning's SLURM requeue): used inside someone else's training loop.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS, *, chain: bool = False) -> None:
        self._signals = signals
        self._chain = chain
        self._previous: dict[signal.Signals, Any] = {}
        self.received: str | None = None
        """Name of the first preemption signal received (e.g. ``"SIGTERM"``), else ``None``."""

    def install(self) -> "PreemptionWatch":
        """Start catching the signals (a no-op off the main thread, where Python cannot)."""
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return self
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the loop checkpoints at the next step boundary.
        if self.received is None:
            self.received = signal.Signals(signum).name
        previous = self._previous.get(signal.Signals(signum)) if self._chain else None
        # SIG_DFL would end the process (SIGTERM's default): the flag replaces it; SIG_IGN is nothing to call.
        if callable(previous):
            previous(signum, frame)

    def __enter__(self) -> "PreemptionWatch":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
