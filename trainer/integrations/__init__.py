"""Integrations: the ledger decides resume and retention for training frameworks people already use.

* :mod:`trainer.integrations.lightning` — ``LedgerCheckpoint``, a PyTorch Lightning callback
  (``pip install 'ckpt-ledger[lightning]'``);
* :mod:`trainer.integrations.transformers` — ``LedgerCallback``, a Hugging Face ``TrainerCallback``
  (``pip install 'ckpt-ledger[transformers]'``);
* :mod:`trainer.integrations.recorder` — the framework-independent part both share: record a
  directory of files a framework wrote as one checkpoint, and find a verified resume target.

The frameworks are imported only by their own module, so importing this package (or the
recorder) never needs either of them installed.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingFrameworkError(ImportError):
    """The framework an integration wraps is not installed (the message says how to install it)."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingFrameworkError` with the one-line install command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and err.name.split(".")[0] != module.split(".")[0]:
            raise  # the framework is there but one of *its* dependencies is missing: show the real error
        raise MissingFrameworkError(
            f"{module.split('.')[0]} is not installed; install it with: pip install 'ckpt-ledger[{extra}]'"
        ) from None
