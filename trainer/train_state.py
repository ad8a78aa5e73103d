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

Loading never executes code: every non-tensor item (DCP's own and ours) is read with
``torch.load(weights_only=True)`` (:class:`SafeLoadPlanner`, :func:`from_bytes`). New
checkpoints hold only plain types and tensors; for checkpoints written before that, the
NumPy RNG state's array is allowed by exactly the NumPy types it needs.
"""

from __future__ import annotations

import io
import pickle
import random
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import DefaultLoadPlanner

from trainer.errors import StartRefusedError


class UnsafeCheckpointError(StartRefusedError):
    """A checkpoint item holds pickled code or types outside the allowlist; it was refused, never run."""


def _numpy_rng_globals() -> list[Any]:
    """Exactly what a pickled ``np.random.get_state()`` array needs (checkpoints from before plain RNG states)."""
    from numpy.core.multiarray import _reconstruct  # noqa: PLC0415 - numpy 1.x and 2.x both provide this path

    allowed: list[Any] = [_reconstruct, np.ndarray, np.dtype]
    uint32 = type(np.dtype(np.uint32))
    if uint32 is not np.dtype:  # numpy >= 1.25: a dtype class per type
        allowed.append(uint32)
    return allowed


def safe_load(data: bytes | io.BytesIO, what: str) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint item; :class:`UnsafeCheckpointError` when it is refused."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = " ".join(str(err).split("\n")[0].split())[:200]
        raise UnsafeCheckpointError(
            f"checkpoint item {what!r} holds pickled code or types outside the allowlist, so it was refused and "
            f"nothing in it was run ({detail}); resume from another checkpoint") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor items load with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:  # noqa: ANN001 - DCP's signature
        loaded = safe_load(value, read_item.dest_index.fqn)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # noqa: PLC0415 - DCP's own helper

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


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
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # Plain types, so that weights_only loading needs no NumPy allowlist.
        "numpy": (str(name), torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)), int(pos),
                  int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put every generator back exactly as :func:`capture_rng` saw it."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_bytes(obj: Any) -> bytes:
    """Serialize a small non-tensor state (may contain CPU tensors)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes, what: str = "state") -> Any:
    """Inverse of :func:`to_bytes`, never running code (``weights_only=True``), even for shards the ledger vouched for."""
    return safe_load(data, what)


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
    return from_bytes(loaded["trainer"], "trainer"), from_bytes(loaded["ranks"][rank_key(rank)], f"ranks.{rank_key(rank)}")
