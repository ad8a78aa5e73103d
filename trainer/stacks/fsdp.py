"""``fsdp``: parameters, gradients and optimizer state sharded across ranks with FSDP2 ``fully_shard``."""

from __future__ import annotations

from typing import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from trainer.stacks.base import Stack


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules sharded as their own FSDP unit: the entries of ``model.blocks`` when present.

    One unit per block lets FSDP free a block's gathered parameters before the next one
    is gathered; the root's own ``fully_shard`` then takes the remaining parameters
    (embeddings, final norm, head).
    """
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else []


class FSDPStack(Stack):
    """Fully sharded data parallelism (FSDP2) over the ``dp`` mesh dimension.

    ``shard_units(model)`` chooses the submodules sharded as their own unit (default: the
    entries of ``model.blocks``); e.g. ``lambda m: list(m.transformer.h)`` for a GPT-2.
    """

    name = "fsdp"

    def __init__(self, shard_units: Callable[[nn.Module], list[nn.Module]] = shard_units) -> None:
        self.shard_units = shard_units

    def parallelize(self, model: nn.Module, mesh: DeviceMesh) -> nn.Module:
        """Shard each unit, then the root, over the ``dp`` mesh (in place; returns the model)."""
        dp_mesh = mesh["dp"]
        units = self.shard_units(model)
        if not isinstance(units, (list, tuple)) or not all(isinstance(u, nn.Module) for u in units):
            raise ValueError(f"shard_units(model) must return a list of submodules, got {type(units).__name__}")
        for unit in units:
            fully_shard(unit, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        return model
