"""Your own FSDP2 loop, checkpointed by ckpt-ledger: your ``fully_shard`` calls, your optimizer and schedule.

    torchrun --standalone --nproc-per-node 2 examples/fsdp_loop.py --run-dir runs/fsdp --steps 120

Checkpoints are sharded: each rank writes its own shard of the parameters and of the
optimizer state (DCP through ``get_state_dict``), every rank's shard is hashed and the
checkpoint is committed only when all of them are durable. Kill it any number of times
and rerun: it ends with the same weights as an uninterrupted run. SIGTERM: saves, exits 75.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from trainer import CheckpointManager


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x))


class Regressor(nn.Module):
    def __init__(self, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x).squeeze(-1)


class Stream:
    """Synthetic regression batches from a per-rank generator; the generator's state is the data position."""

    def __init__(self, rank: int, seed: int, batch_size: int = 16) -> None:
        self.generator = torch.Generator().manual_seed(seed * 100 + rank)
        self.weights = torch.randn(16, generator=torch.Generator().manual_seed(seed))
        self.batch_size = batch_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(self.batch_size, 16, generator=self.generator)
        return x, torch.tanh(x @ self.weights)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=120, help="the run's total step target")
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds of pretend work per step")
    args = parser.parse_args()

    if "WORLD_SIZE" in os.environ:  # torchrun
        dist.init_process_group("gloo")
    else:  # one process: FSDP still needs a process group
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank()

    torch.manual_seed(args.seed)
    model = Regressor()
    for layer in model.layers:  # your own FSDP units
        fully_shard(layer)
    fully_shard(model)
    torch.manual_seed(args.seed + 1 + rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    data = Stream(rank, args.seed)
    state = {"model": model, "optim": optimizer, "sched": scheduler, "data": data}

    with CheckpointManager(args.run_dir, save_every=args.save_every, keep_last=2) as ckpt:
        start = ckpt.restore(state)
        for step in range(start + 1, args.steps + 1):
            inputs, targets = data.next_batch()
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            time.sleep(args.sleep)

            ckpt.log(step, loss=loss.item())
            if ckpt.should_save(step) or step == args.steps:
                ckpt.save(step, state, block=step == args.steps)
            if ckpt.should_stop(step):
                ckpt.save(step, state, block=True)
                break
    dist.destroy_process_group()
    return ckpt.exit_code


if __name__ == "__main__":
    sys.exit(main())
