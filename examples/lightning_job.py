"""A small PyTorch Lightning job whose checkpoints, resume and retention go through the ledger.

    python examples/lightning_job.py --run-dir runs/lit --steps 200 --every 50
    ckpt-ledger inspect runs/lit

Kill it (even with SIGKILL) and run the same command again: it resumes from the ledger's
verified resume target and finishes at --steps. SIGTERM/SIGUSR1 save, record the attempt
as preempted and exit 75 ("requeue me"). Needs ``pip install 'ckpt-ledger[lightning]'``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning as L
from trainer.integrations.lightning import LedgerCheckpoint


class Regression(L.LightningModule):
    """A two-layer MLP learning a fixed random linear map (loss visibly falls)."""

    def __init__(self, step_sleep: float = 0.0) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.step_sleep = step_sleep

    def training_step(self, batch, batch_idx):
        if self.step_sleep:
            time.sleep(self.step_sleep)  # stands in for real work, so a test can kill it mid-run
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def make_data(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    w = torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, x @ w + 0.01 * torch.randn(n, 1, generator=gen))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=200, help="total optimizer steps of the run")
    parser.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--val-every", type=int, default=None, help="validate every N steps (default: --every)")
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--keep-best", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="e.g. ddp (CPU processes over gloo)")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args(argv)

    L.seed_everything(0, workers=True)
    train = DataLoader(make_data(512, seed=1), batch_size=16, shuffle=True)
    val = DataLoader(make_data(128, seed=2), batch_size=64)
    cb = LedgerCheckpoint(args.run_dir, every_n_train_steps=args.every, keep_last=args.keep_last,
                          keep_best=args.keep_best, monitor="val_loss", mode="min")
    trainer = L.Trainer(
        max_steps=args.steps, callbacks=[cb], accelerator="cpu", devices=args.devices, strategy=args.strategy,
        val_check_interval=args.val_every or args.every, check_val_every_n_epoch=None,
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.run_dir,
    )
    trainer.fit(Regression(args.step_sleep), train, val, ckpt_path=LedgerCheckpoint.resume_path(args.run_dir))
    return cb.exit_code


if __name__ == "__main__":
    sys.exit(main())
