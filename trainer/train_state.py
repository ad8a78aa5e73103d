"""What a checkpoint holds beyond model and optimizer: step, scheduler, every RNG and the data position.

Bitwise-exact resume needs every source of randomness and order to continue exactly
where it stopped: Python's ``random``, NumPy's global generator, torch's CPU (and
CUDA) generators — per rank, since dropout masks differ between ranks — and the data
position of each data-parallel rank.

Layout inside the DCP checkpoint::

    model.*      sharded or replicated tensors (the stack's state dict)
    optim.*      optimizer state (the stack's state dict)
    trainer      bytes: {"step", "scheduler"}            -- identical on every rank
    ranks.r<N>   bytes: {"rng", "data"} of rank N        -- one key per rank

Non-tensor parts are serialized to ``bytes`` here so DCP stores each as one opaque
item instead of flattening tuples (Python's RNG state has 625 entries).
"""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) alike on every rank, e.g. before model init."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank(seed: int, rank: int) -> None:
    """Give each rank its own streams after model init (dropout masks differ between ranks)."""
    seed_everything((seed * 1_000_003 + rank * 7_919 + 1) % 2**63)


def capture_rng() -> dict[str, Any]:
    """The state of every global generator this process uses."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put every generator back exactly as :func:`capture_rng` saw it."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_bytes(obj: Any) -> bytes:
    """Serialize a small non-tensor state (may contain CPU tensors)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Any:
    """Inverse of :func:`to_bytes`. Only called on shards whose hash the ledger vouched for."""
    return torch.load(io.BytesIO(data), weights_only=False)


def rank_key(rank: int) -> str:
    """The checkpoint key of one rank's private state."""
    return f"r{rank}"


def pack(*, model_state: dict, optim_state: dict, step: int, scheduler_state: dict, rank: int,
         data_state: dict) -> dict[str, Any]:
    """The state dict one rank hands to DCP."""
    return {
        "model": model_state,
        "optim": optim_state,
        "trainer": to_bytes({"step": step, "scheduler": scheduler_state}),
        "ranks": {rank_key(rank): to_bytes({"rng": capture_rng(), "data": data_state})},
    }


def load_template(*, model_state: dict, optim_state: dict, rank: int) -> dict[str, Any]:
    """The structure DCP loads into (it fills tensors in place and replaces the ``bytes`` items)."""
    return {"model": model_state, "optim": optim_state, "trainer": b"", "ranks": {rank_key(rank): b""}}


def unpack(loaded: dict[str, Any], rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trainer_state, rank_state)`` from a loaded template."""
    return from_bytes(loaded["trainer"]), from_bytes(loaded["ranks"][rank_key(rank)])
