"""Resuming: a verified load of the trainer's checkpoint vs reading the same bytes (``resume_load_vs_raw_read``).

The checkpoint is one the trainer wrote itself (a 2-step run of ``WideMLP`` with a final,
synchronous checkpoint, 403 MB of state; 57 MB with ``--quick``). Ours is the trainer's
resume path without the model rebuild: ``Checkpointer.verify`` (every shard hashed
against the ledger) then ``Checkpointer.load`` into the model's and AdamW's state dicts;
the baseline reads the same files with ``readinto`` into one preallocated buffer. Both
read what the page cache holds (an untimed read first), order alternated.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from bench._checkpoint_floors import read_raw
from bench.harness import Context, Record, benchmark, median, spread, time_once
from bench.trainer_checkpoint import Shape, baseline_state, process_group, single_rank_process, train
from ledger import Ledger, LocalBlobStore, RetentionPolicy
from trainer.checkpointing import Candidate, Checkpointer
from trainer.process_group import init_distributed
from trainer.train_state import load_template


@benchmark("resume_load_vs_raw_read")
def resume_load_vs_raw_read(ctx: Context) -> list[Record]:
    shape = Shape(width=ctx.reps(768, 2048), layers=8)
    rounds = ctx.reps(2, 3)
    scratch = ctx.scratch("resume-load")
    run_dir = scratch / "run"
    ours: list[float] = []
    raw: list[float] = []
    with single_rank_process(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(run_dir, shape, steps=2, ckpt_every=2, async_checkpoint=False, keep=True)
        candidate = Candidate.of(Ledger.open(run_dir, read_only=True).projection().resume)
        blobs = LocalBlobStore(run_dir)
        paths = [blobs.path(shard.location) for shard in candidate.shards]
        nbytes = sum(shard.bytes for shard in candidate.shards)
        buffer = memoryview(torch.empty(nbytes, dtype=torch.uint8).numpy()).cast("B")
        model, optimizer = baseline_state(shape)
        with process_group():
            dist_ctx = init_distributed(60.0)
            checkpointer = Checkpointer(dist_ctx, blobs, None, stack="ddp", topology={"dp": 1, "tp": 1, "pp": 1},
                                        retention=RetentionPolicy())

            def verified_load() -> None:
                model_sd, optim_sd = get_state_dict(model, optimizer)
                if checkpointer.verify(candidate):
                    raise RuntimeError(f"checkpoint {candidate.checkpoint_id} does not verify")
                checkpointer.load(candidate, load_template(model_state=model_sd, optim_state=optim_sd, rank=0))

            read_raw(paths, buffer)  # untimed warm-up: both read what the page cache holds
            for r in range(rounds):
                for name in (("ours", "raw") if r % 2 == 0 else ("raw", "ours")):
                    if name == "ours":
                        ours.append(time_once(verified_load))
                    else:
                        raw.append(time_once(lambda: read_raw(paths, buffer)))
    shutil.rmtree(run_dir)
    mine, base = median(ours), median(raw)
    return [Record.of(
        "resume_load_vs_raw_read", mine, base, "s", goal="ratio <= 1.5", met=mine / base <= 1.5,
        note=f"verified load of the resume checkpoint (every shard hashed, then DCP's load into the model's and "
             f"AdamW's state dicts) vs readinto of the same {nbytes / 1e6:.0f} MB into one preallocated buffer, "
             f"both from the page cache; {rounds} rounds, order alternated",
        detail={"state_bytes": shape.state_bytes(), "bytes": nbytes, "ours_s": spread(ours), "raw_s": spread(raw)},
    )]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.harness import run_module

    sys.exit(run_module(__file__))
