"""Joining the process group, wherever the process came from, and the few collectives the trainer uses.

A worker learns its place from the environment: torchrun and our own launcher set
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; under SLURM ``srun`` those come from
``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; a lone process is rank 0 of 1.
CPU runs use gloo (on loopback unless told otherwise), CUDA runs nccl.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, MutableMapping

import torch
import torch.distributed as dist

from trainer.rendezvous import is_loopback
from trainer.slurm import SlurmStep

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class DistContext:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool
    """Whether we created the process group (and so must destroy it)."""

    @property
    def is_coordinator(self) -> bool:
        """Rank 0 alone talks to the ledger."""
        return self.rank == 0


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (good enough for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def apply_single_node_defaults(env: MutableMapping[str, str]) -> None:
    """Defaults for a single-node CPU run: loopback master, a free port, gloo bound to ``lo``.

    Only unset variables are filled: a user's (or scheduler's) choice always wins.
    """
    env.setdefault("MASTER_ADDR", LOOPBACK)
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(free_port())
    if is_loopback(env["MASTER_ADDR"]):
        # gloo picks the interface of the hostname otherwise, which may not route to 127.0.0.1.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")


def under_srun(env: MutableMapping[str, str]) -> bool:
    """Whether this process is one task of a multi-task SLURM step (``srun``) not already given a rank."""
    if "RANK" in env:
        return False
    step = SlurmStep.from_env(env)  # ValueError naming the variable when SLURM's are inconsistent
    return step is not None and step.ntasks > 1


def map_slurm_env(env: MutableMapping[str, str]) -> None:
    """Translate ``srun``'s task variables into the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` torch reads."""
    step = SlurmStep.from_env(env)
    if step is not None:
        env.update(step.worker_env(env))


def slurm_facts(env: MutableMapping[str, str]) -> dict[str, Any] | None:
    """The SLURM identity recorded in ``attempt.started.slurm`` (``None`` outside SLURM)."""
    if "SLURM_JOB_ID" not in env:
        return None
    return {
        "job_id": env["SLURM_JOB_ID"],
        "restart_count": int(env.get("SLURM_RESTART_COUNT", "0")),
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "nodelist": env.get("SLURM_JOB_NODELIST"),
        "nnodes": int(env["SLURM_NNODES"]) if env.get("SLURM_NNODES", "").isdigit() else None,
    }


def context_of_current_group() -> DistContext:
    """The context of a default process group someone else initialized (we do not own it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return DistContext(rank, world, local_rank, _device(local_rank), dist.get_backend(), owns_group=False)


def join_current_or_single(timeout_s: float) -> DistContext:
    """The caller's process group if there is one, else a one-process gloo group of our own.

    For code that runs inside someone else's loop: it never joins a multi-process job on
    its own (that is the loop's ``init_process_group`` to do) and never needs a port:
    the lone process's group rendezvous through an in-memory store.
    """
    if dist.is_initialized():
        return context_of_current_group()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise RuntimeError(f"WORLD_SIZE={world} but no process group is initialized: call "
                           "torch.distributed.init_process_group() first")
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timedelta(seconds=timeout_s))
    return DistContext(0, 1, 0, torch.device("cpu"), "gloo", owns_group=True)


def init_distributed(timeout_s: float) -> DistContext:
    """Join (or create) the default process group; every collective times out after ``timeout_s``."""
    env = os.environ
    if dist.is_initialized():
        return context_of_current_group()
    if under_srun(env):
        map_slurm_env(env)
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        apply_single_node_defaults(env)
    local_rank = int(env.get("LOCAL_RANK", "0"))
    device = _device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend, owns_group=True)


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def new_side_group() -> dist.ProcessGroup:
    """A second gloo group over every rank, for collectives issued off the training thread.

    Collectives on one group must be issued in the same order on every rank; a background
    checkpoint writer interleaving its own with the training loop's (DDP's all-reduce,
    FSDP's all-gather) on the default group could not guarantee that. Its own group
    keeps the two streams of collectives independent. Collective (every rank calls it).
    """
    return dist.new_group(backend="gloo")


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """Rank ``src``'s ``obj`` on every rank (of ``group``; default: the default group)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_objects(obj: Any, dst: int = 0, group: dist.ProcessGroup | None = None) -> list[Any] | None:
    """Every rank's ``obj`` (in rank order) on ``dst``; ``None`` elsewhere."""
    out: list[Any] | None = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def all_reduce_max(values: list[int], device: torch.device) -> list[int]:
    """Element-wise maximum of small integer vectors over all ranks."""
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(v) for v in tensor.tolist()]


def all_reduce_mean(value: torch.Tensor) -> float:
    """Mean of a scalar over all ranks (a copy; ``value`` is untouched)."""
    tensor = value.detach().clone().to(torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor) / dist.get_world_size()
