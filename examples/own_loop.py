"""Your own training loop, checkpointed by ckpt-ledger: plain PyTorch, DDP, SGD with momentum, StepLR.

Run it in one process, or on N under torchrun (each rank trains on its slice of the data):

    python examples/own_loop.py --run-dir runs/own --steps 200
    torchrun --standalone --nproc-per-node 2 examples/own_loop.py --run-dir runs/own --steps 200

Kill it (``kill -9``) and run the same command again: it resumes from the newest
committed checkpoint and ends with exactly the weights of an uninterrupted run.
``kill -TERM`` (or SIGUSR1) saves at the next step and exits 75: "requeue me".
``ckpt-ledger inspect runs/own`` shows the attempts and checkpoints.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import CheckpointManager


class ShuffledBatches:
    """The user's own data object: a fixed synthetic dataset, reshuffled every epoch, split across ranks.

    Its position (epoch, batch) is what ``state_dict`` saves: a resumed run continues
    with exactly the batches the uninterrupted run would have seen.
    """

    def __init__(self, rank: int, world: int, *, seed: int, batch_size: int = 16, samples: int = 512) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(samples, 32, generator=generator)
        self.targets = (self.inputs[:, :8].sum(dim=1) > 0).long() + (self.inputs[:, 8:16].sum(dim=1) > 0).long()
        self.rank, self.world, self.seed, self.batch_size = rank, world, seed, batch_size
        self.epoch, self.position = 0, 0

    def _order(self) -> torch.Tensor:
        order = torch.randperm(len(self.inputs), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        return order[self.rank::self.world]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = self._order()
        if (self.position + 1) * self.batch_size > len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self._order()
        index = order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
        self.position += 1
        return self.inputs[index], self.targets[index]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 3))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=200, help="the run's total step target")
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds of pretend work per step")
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ  # under torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model()
    if distributed:
        model = DistributedDataParallel(model)
    torch.manual_seed(args.seed + 1 + rank)  # each rank's own dropout masks
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)
    data = ShuffledBatches(rank, world, seed=args.seed)
    evaluation = ShuffledBatches(0, 1, seed=args.seed + 7, samples=128)
    state = {"model": model, "optim": optimizer, "sched": scheduler, "data": data}

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = nn.functional.cross_entropy(model(evaluation.inputs), evaluation.targets)
        model.train()
        if distributed:  # every rank records the same value
            dist.all_reduce(loss)
            loss /= world
        return float(loss)

    with CheckpointManager(args.run_dir, save_every=args.save_every, keep_last=3, keep_best=1,
                           best_metric="eval_loss") as ckpt:
        start = ckpt.restore(state)
        for step in range(start + 1, args.steps + 1):
            inputs, targets = data.next_batch()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            time.sleep(args.sleep)

            ckpt.log(step, loss=loss.item(), lr=scheduler.get_last_lr()[0])
            if ckpt.should_save(step) or step == args.steps:
                ckpt.save(step, state, metrics={"eval_loss": eval_loss()}, block=step == args.steps)
            if ckpt.should_stop(step):  # SIGTERM/SIGUSR1 on any rank, or a newer attempt took over
                ckpt.save(step, state, block=True)
                break
    if distributed:
        dist.destroy_process_group()
    return ckpt.exit_code


if __name__ == "__main__":
    sys.exit(main())
