"""One rank of a real ``Trainer`` attempt (run by the resharding tests, one process per rank).

Between construction (which resumes) and ``fit()`` the rank records what it loaded:
the consolidated model weights and, for the data-parallel stacks, the consolidated
optimizer state. Rank 0 saves them to ``--out`` so the test can compare them with the
checkpoint's own files. Exits with the attempt's exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from trainer import Trainer, TrainerConfig, TrainerError
from trainer.default_job import JobSpec, default_job


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="TrainerConfig fields as JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = TrainerConfig(**json.loads(args.config))
    model_fn, data_fn, loss_fn, _ = default_job(JobSpec(**{k: v for k, v in config.job.items() if k != "name"}))
    try:
        trainer = Trainer(config, model_fn=model_fn, data_fn=data_fn, loss_fn=loss_fn)
    except TrainerError as err:
        print(f"refused: {err}", flush=True)
        return err.exit_code
    loaded = {"start_step": trainer.step, "weights": trainer.stack.full_model_state(trainer.model)}
    if config.stack in ("ddp", "fsdp"):
        optim = get_optimizer_state_dict(trainer.model, trainer.optimizer,
                                         options=StateDictOptions(full_state_dict=True))
        loaded["optim"] = {f"{fqn}.{name}": value.detach().cpu().clone()
                           for fqn, state in optim["state"].items() for name, value in state.items()}
    if trainer.ctx.rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save(loaded, Path(args.out) / "loaded.pt")
    outcome = trainer.fit()
    print(f"outcome: {outcome.status} at step {outcome.step}", flush=True)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
