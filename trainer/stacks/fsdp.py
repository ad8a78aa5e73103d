"""``fsdp``: parameters, gradients and optimizer state sharded across ranks with FSDP2 ``fully_shard``."""

from __future__ import annotations

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
    """Fully sharded data parallelism (FSDP2) over the ``dp`` mesh dimension."""

    name = "fsdp"

    def parallelize(self, model: nn.Module, mesh: DeviceMesh) -> nn.Module:
        """Shard each block, then the root, over the ``dp`` mesh (in place; returns the model)."""
        dp_mesh = mesh["dp"]
        for unit in shard_units(model):
            fully_shard(unit, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        return model
