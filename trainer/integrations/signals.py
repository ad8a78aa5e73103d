"""Preemption signals inside someone else's training loop: note them, keep the framework's own handlers working.

Schedulers ask a job to stop with SIGTERM (``scancel``, SLURM's grace period) or a
configured SIGUSR1. The frameworks may have handlers of their own (Lightning's SLURM
requeue, its SIGTERM notifier), so ours only remembers the first signal and then calls
whatever handler was installed before it; the callbacks act on the flag at the next
step boundary, where saving is safe.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Remembers the first SIGTERM/SIGUSR1 (by name) and chains to the previously installed handlers."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self._signals = signals
        self._previous: dict[signal.Signals, Any] = {}
        self.received: str | None = None
        """Name of the first preemption signal received (e.g. ``"SIGTERM"``), else ``None``."""

    def install(self) -> "PreemptionFlag":
        """Start noting the signals (a no-op off the main thread, where Python cannot install handlers)."""
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return self
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
        previous = self._previous.get(signal.Signals(signum))
        # SIG_DFL would end the process (SIGTERM's default): the flag replaces it; SIG_IGN is nothing to call.
        if callable(previous):
            previous(signum, frame)
