"""One rank of a ``CheckpointManager`` loop that checks which ranks touch the ledger (tests/test_null_recorder.py).

Every rank but 0 wraps ``Ledger.__init__`` and ``RunRecorder.__init__`` so that opening a
ledger there leaves a ``rank<N>.opened_ledger`` file in ``--out`` (the run goes on: the test
judges). ``--fence-at STEP``: after that step rank 0 begins a newer attempt on the run, as a
second job would, so the next save is fenced. Each rank writes ``rank<N>.json``: the class
of its recorder during the loop and after close, each save's status, and how it ended.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ledger import Ledger
from trainer import CheckpointManager
from trainer.run_recorder import RunRecorder


def spy_on_ledger_opens(out: Path, rank: int) -> None:
    """Leave a file naming the caller whenever this rank opens a ledger (it never should)."""
    for cls in (Ledger, RunRecorder):
        cls.__init__ = _reporting(cls, cls.__init__, out / f"rank{rank}.opened_ledger")


def _reporting(cls: type, original, marker: Path):  # noqa: ANN001, ANN202 - wraps an __init__
    def opened(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        with open(marker, "a") as file:
            file.write(f"{cls.__name__} opened:\n{''.join(traceback.format_stack())}\n")
        original(self, *args, **kwargs)

    return opened


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--fence-at", type=int, default=None)
    args = parser.parse_args()
    out = Path(args.out)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank != 0:
        spy_on_ledger_opens(out, rank)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model, "optim": optimizer}
    saves = []
    with CheckpointManager(args.run_dir, save_every=2, async_save=True, log_every=1, verbose=False) as ckpt:
        start = ckpt.restore(state)
        recorder_in_loop = type(ckpt.recorder).__name__
        for step in range(start + 1, args.steps + 1):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ckpt.log(step, loss=float(loss))
            if rank == 0 and step == args.fence_at:
                with Ledger.open(args.run_dir) as newer:  # a second job of the same run starts
                    newer.begin_attempt(job_id="newer", world_size=1, stack="ddp", topology={"dp": 1, "tp": 1, "pp": 1})
            if ckpt.should_save(step) or step == args.steps:
                saves.append(ckpt.save(step, state, metrics={"eval_loss": 1.0 / step}, block=True).status)
            if ckpt.should_stop(step):
                break
    result = {"recorder_in_loop": recorder_in_loop, "recorder_after_close": type(ckpt.recorder).__name__,
              "saves": saves, "status": ckpt.status, "exit_code": ckpt.exit_code, "pid": os.getpid()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
