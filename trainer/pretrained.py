"""Reading ``--pretrained`` weights: a plain torch state-dict file, model weights only."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from trainer.errors import BadInputError

#: Prefixes that wrappers add to parameter names (DDP, torch.compile); a plain state dict has none.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def plain_key(key: str) -> str:
    """``module._orig_mod.blocks.0.wq.weight`` -> ``blocks.0.wq.weight``."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key.replace("._orig_mod.", ".")


def read_pretrained(path: str) -> dict[str, torch.Tensor]:
    """Load a ``{name: tensor}`` file with ``torch.load(weights_only=True)``; wrapper prefixes are removed."""
    file = Path(path)
    if not file.is_file():
        raise BadInputError(f"--pretrained {path}: no such file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise BadInputError(f"--pretrained {path}: not a torch state-dict file ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BadInputError(f"--pretrained {path}: expected a non-empty dict of parameter name -> tensor")
    return {plain_key(k): v for k, v in state.items()}
