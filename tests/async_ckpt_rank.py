"""One rank of an attempt exercising asynchronous checkpoints (run by tests/test_async_checkpoint.py).

Scenarios (``--scenario``):

* ``timings``: train with background checkpoints; rank 0 writes every ``CheckpointTiming``,
  the staging buffer allocations seen after each checkpoint, and whether a second
  ``save_async`` while one is in flight is refused, to ``--out/result.json``.
* ``commit_fails``: rank 0's ledger refuses the first commit with an I/O error, in the
  background; ``fit()`` must raise on every rank. Each rank prints what it raised.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ledger import LedgerWriteError
from trainer import Trainer, TrainerConfig
from trainer.checkpointing import BackgroundCheckpointError
from trainer.default_job import JobSpec, default_job
from trainer.run_recorder import RunRecorder
from trainer.staging import StagingArea


def staged_matches_live(trainer: Trainer) -> bool:
    """Stage the live state and compare every tensor (DTensors by their local shard)."""
    model_state, optim_state = trainer.stack.state_dicts(trainer.model, trainer.optimizer)
    live = {"model": model_state, "optim": optim_state}
    staged = StagingArea().stage(live)  # not the checkpointer's: its buffers may be in flight

    def pairs(a, b):  # noqa: ANN001, ANN202
        if isinstance(a, dict):
            for key in a:
                yield from pairs(a[key], b[key])
        elif isinstance(a, torch.Tensor):
            yield a, b

    for source, copy in pairs(live, staged):
        if type(source) is not type(copy):
            return False
        local_source = source.to_local() if hasattr(source, "to_local") else source
        local_copy = copy.to_local() if hasattr(copy, "to_local") else copy
        if local_source.data_ptr() == local_copy.data_ptr() or not torch.equal(local_source, local_copy):
            return False
        if getattr(source, "placements", None) != getattr(copy, "placements", None):
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--scenario", required=True, choices=("timings", "commit_fails"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = TrainerConfig(**json.loads(args.config))
    model_fn, data_fn, loss_fn, _ = default_job(JobSpec())

    if args.scenario == "commit_fails" and int(os.environ["RANK"]) == 0:
        real_commit = RunRecorder.record_and_commit

        def failing_commit(self, checkpoint_id, shards):  # noqa: ANN001, ANN202
            if checkpoint_id.startswith("step000010"):
                raise LedgerWriteError("disk I/O error while appending to the ledger (injected)")
            return real_commit(self, checkpoint_id, shards)

        RunRecorder.record_and_commit = failing_commit

    trainer = Trainer(config, model_fn=model_fn, data_fn=data_fn, loss_fn=loss_fn)
    allocations: list[int] = []
    refused_second = None
    staging_exact: list[bool] = []
    if args.scenario == "timings":
        real_save_async = trainer.checkpointer.save_async

        def watching_save_async(state, *, step, epoch, started=None):  # noqa: ANN001, ANN202
            nonlocal refused_second
            result = real_save_async(state, step=step, epoch=epoch, started=started)
            allocations.append(trainer.checkpointer.staging.allocations)
            staging_exact.append(staged_matches_live(trainer))
            if refused_second is None and trainer.checkpointer.in_flight is not None:
                try:
                    real_save_async(state, step=step, epoch=epoch)
                    refused_second = False
                except RuntimeError:
                    refused_second = True
            return result

        trainer.checkpointer.save_async = watching_save_async
    try:
        outcome = trainer.fit()
    except BackgroundCheckpointError as err:
        print(f"raised: {err}", flush=True)
        return 3
    if args.scenario == "timings":
        result = {
            "staging_exact": staging_exact,
            "status": outcome.status,
            "timings": [vars_of(t) for t in trainer.checkpoint_timings],
            "allocations": allocations,
            "refused_second": refused_second,
        }
        if int(os.environ["RANK"]) == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "result.json").write_text(json.dumps(result))
    return outcome.exit_code


def vars_of(timing) -> dict:  # noqa: ANN001
    return {name: getattr(timing, name) for name in timing.__slots__}


if __name__ == "__main__":
    sys.exit(main())
