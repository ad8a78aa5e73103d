"""What a parallelism stack is: its topology, how it wraps a model, steps it and moves its state.

A stack is one class and one registry entry. The trainer never branches on a stack's
name: everything stack-specific goes through these methods, so adding a stack (say
``tppp``, which splits the model into pipeline stages and tensor-parallel layers and
owns the forward/backward of a pipeline schedule) is one new module, not a new
builder per (stack x model) combination.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

if TYPE_CHECKING:
    from trainer.config import TrainerConfig

#: ``loss_fn(model_output, targets) -> scalar loss``.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class Topology:
    """How the world is split: ``tp * pp * dp == world_size``."""

    tp: int
    pp: int
    dp: int

    @classmethod
    def resolve(cls, world_size: int, *, tp: int = 1, pp: int = 1) -> "Topology":
        """Infer ``dp = world_size / (tp * pp)``; raises ``ValueError`` when it does not divide."""
        if tp < 1 or pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={tp} pp={pp}")
        if world_size % (tp * pp):
            raise ValueError(f"tp*pp = {tp}*{pp} = {tp * pp} does not divide the world size {world_size}")
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))

    def as_dict(self) -> dict[str, int]:
        """The form recorded in ``attempt.started`` and ``checkpoint.started``."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp}


class Stack(ABC):
    """A parallelism stack. Subclasses set ``name`` and implement :meth:`parallelize`.

    The defaults fit data-parallel stacks (one model replica or shard group per rank,
    a plain forward/backward). Model- and pipeline-parallel stacks override
    :meth:`topology` limits, :meth:`build_mesh`, :meth:`data_parallel_coordinates`
    and :meth:`train_step`.
    """

    name: ClassVar[str]
    """Registry name, as passed to ``--stack``."""

    max_tp: ClassVar[int | None] = 1
    """Largest tensor-parallel degree the stack supports (``None``: any)."""

    max_pp: ClassVar[int | None] = 1
    """Largest pipeline-parallel degree the stack supports (``None``: any)."""

    @classmethod
    def from_config(cls, config: "TrainerConfig") -> "Stack":
        """The stack configured by a run's config (stacks without options of their own: ``cls()``)."""
        return cls()

    def topology(self, world_size: int, *, tp: int = 1, pp: int = 1) -> Topology:
        """Validate and return the topology this stack would use on ``world_size`` ranks."""
        for label, value, limit in (("tp", tp, self.max_tp), ("pp", pp, self.max_pp)):
            if limit is not None and value > limit:
                raise ValueError(f"stack {self.name!r} supports {label} <= {limit}, got {label}={value}")
        return Topology.resolve(world_size, tp=tp, pp=pp)

    def check_model(self, model: nn.Module, topology: Topology) -> None:
        """Raise ``ValueError`` if ``model`` cannot be parallelized as ``topology`` (before any process group exists).

        Data-parallel stacks take any model; model-parallel stacks check that it splits.
        """

    def build_mesh(self, topology: Topology, device_type: str) -> DeviceMesh:
        """The device mesh (data-parallel stacks: one ``dp`` dimension)."""
        return init_device_mesh(device_type, (topology.dp,), mesh_dim_names=("dp",))

    def data_parallel_coordinates(self, mesh: DeviceMesh) -> tuple[int, int]:
        """``(dp_rank, dp_size)``: which slice of the data this rank consumes."""
        dp_mesh = mesh["dp"]
        return dp_mesh.get_local_rank(), dp_mesh.size()

    @abstractmethod
    def parallelize(self, model: nn.Module, mesh: DeviceMesh) -> nn.Module:
        """Wrap or shard ``model`` (already on its device) for this stack; returns the module to train."""

    def train_step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """Forward and backward of one batch; returns the detached local loss. Pipeline stacks override."""
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        return loss.detach()

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """Loss of one batch without gradients (the model is in eval mode)."""
        return loss_fn(model(inputs), targets).detach()

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Model and optimizer state dicts in checkpoint form (sharded where the stack shards)."""
        return get_state_dict(model, optimizer)

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
        """Put loaded model and optimizer state back (the inverse of :meth:`state_dicts`)."""
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(strict=True))

    def load_full_model_state(self, model: nn.Module, full_state: dict) -> None:
        """Load a consolidated (unsharded, plain-keyed) model state dict, e.g. ``--pretrained`` weights."""
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, strict=True))

    def full_model_state(self, model: nn.Module) -> dict:
        """The consolidated, plain-keyed model state dict (collective; every rank gets it)."""
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
