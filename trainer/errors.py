"""Errors the trainer raises when it cannot do what was asked; each carries the CLI's exit code."""

from __future__ import annotations

EXIT_PROBLEM = 1  # the ledger says it cannot be done (fenced, a requested checkpoint missing or corrupt)
EXIT_USAGE = 2  # bad input (a pretrained file that is not a state dict, a topology that does not fit)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: preempted and saved, requeue me


class TrainerError(Exception):
    """The trainer refused to start or continue; ``exit_code`` is what ``ckpt-ledger train`` exits with."""

    exit_code = EXIT_PROBLEM


class StartRefusedError(TrainerError):
    """The run cannot start from the requested (or any loadable) source, and a fresh start would be wrong."""


class BadInputError(TrainerError, ValueError):
    """An input given to the trainer is unusable (e.g. ``--pretrained`` is not a state-dict file)."""

    exit_code = EXIT_USAGE
