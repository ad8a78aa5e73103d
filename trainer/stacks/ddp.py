"""``ddp``: a full model replica per rank, gradients all-reduced by DistributedDataParallel."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel

from trainer.stacks.base import Stack


class DDPStack(Stack):
    """Data parallelism with replicated parameters and optimizer state."""

    name = "ddp"

    def parallelize(self, model: nn.Module, mesh: DeviceMesh) -> nn.Module:
        """Wrap in DDP over the ``dp`` group (parameters are broadcast from rank 0)."""
        device = next(model.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        # DCP's get_state_dict strips the ``module.`` prefix, so checkpoints and exports
        # carry the plain parameter names whatever wrapper is used.
        return DistributedDataParallel(model, device_ids=device_ids, process_group=mesh["dp"].get_group())
