"""One rank of the ``tppp`` mechanics test (run by tests/test_tppp.py, one process per rank).

Trains the default model (dropout off) for a few steps under ``TpppStack``, then checks
on every rank that its checkpoint state round-trips: a freshly initialised model loads
the consolidated weights (``load_full_model_state``) and, separately, the DCP checkpoint
(``state_dicts``/``load_state_dicts``), and one more step from the reloaded state matches
one more step of the original. Rank 0 writes what the test compares against an unsplit
single-process run.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from tppp_reference import LR, SEED, SPEC
from trainer.default_job import MarkovText, TinyLM, lm_loss
from trainer.stacks.tppp import TpppStack


def build(stack: TpppStack, mesh, seed: int):
    torch.manual_seed(seed)
    module = stack.parallelize(TinyLM(SPEC), mesh)
    return module, torch.optim.AdamW(module.parameters(), lr=LR)


def step(stack, module, optimizer, data) -> float:
    inputs, targets = data.next_batch()
    loss = stack.train_step(module, inputs, targets, lm_loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--schedule", default="1F1B")
    parser.add_argument("--microbatches", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    stack = TpppStack(schedule=args.schedule, microbatches=args.microbatches)
    topology = stack.topology(world, tp=args.tp, pp=args.pp)
    mesh = stack.build_mesh(topology, "cpu")
    module, optimizer = build(stack, mesh, SEED)
    dp_rank, dp_size = stack.data_parallel_coordinates(mesh)
    data = MarkovText(SPEC, dp_rank=dp_rank, dp_size=dp_size, seed=SEED)

    losses = [step(stack, module, optimizer, data) for _ in range(args.steps)]
    module.eval()
    eval_x, eval_y = next(iter(data.eval_batches()))
    eval_loss = float(stack.eval_loss(module, eval_x, eval_y, lm_loss))
    module.train()

    model_state, optim_state = stack.state_dicts(module, optimizer)
    full = stack.full_model_state(module)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(out / "dcp"))
    keys = {"model": sorted(model_state), "dtensor": sorted(k for k, v in model_state.items() if isinstance(v, DTensor)),
            "optim_state": sorted(optim_state["state"]), "param_groups": optim_state["param_groups"][0]["params"]}

    # A fresh stack and model (other seed) loading the consolidated weights.
    other = TpppStack(schedule=args.schedule, microbatches=args.microbatches)
    fresh, _ = build(other, mesh, SEED + 1)
    other.load_full_model_state(fresh, full)
    reloaded_full = other.full_model_state(fresh)
    full_round_trip = all(torch.equal(reloaded_full[k], full[k]) for k in full)

    # Another one loading the DCP checkpoint, optimizer included; then one more step on both.
    third = TpppStack(schedule=args.schedule, microbatches=args.microbatches)
    resumed, resumed_optimizer = build(third, mesh, SEED + 2)
    template_model, template_optim = third.state_dicts(resumed, resumed_optimizer)
    template = {"model": template_model, "optim": template_optim}
    dcp.load(template, checkpoint_id=str(out / "dcp"))
    third.load_state_dicts(resumed, resumed_optimizer, template["model"], template["optim"])
    saved_optim = {k: {n: local(v).clone() for n, v in s.items()} for k, s in optimizer.state_dict()["state"].items()}
    loaded_optim = resumed_optimizer.state_dict()["state"]
    optim_round_trip = saved_optim.keys() == loaded_optim.keys() and all(
        torch.equal(local(loaded_optim[k][n]), v) for k, s in saved_optim.items() for n, v in s.items())
    resumed_data = MarkovText(SPEC, dp_rank=dp_rank, dp_size=dp_size, seed=SEED)
    resumed_data.load_state_dict(data.state_dict())
    next_loss = step(stack, module, optimizer, data)
    resumed_next_loss = step(third, resumed, resumed_optimizer, resumed_data)
    after = stack.full_model_state(module)
    resumed_after = third.full_model_state(resumed)
    resume_matches = next_loss == resumed_next_loss and all(torch.equal(after[k], resumed_after[k]) for k in after)

    checks = {"full_round_trip": full_round_trip, "optim_round_trip": optim_round_trip, "resume_matches": resume_matches,
              "losses": losses, "eval_loss": eval_loss, "keys": keys, "dp_rank": dp_rank,
              "pp_rank": mesh["pp"].get_local_rank(), "tp_rank": mesh["tp"].get_local_rank()}
    everyone = [None] * world
    dist.all_gather_object(everyone, checks)
    if rank == 0:
        torch.save(full, out / "full.pt")
        (out / "result.json").write_text(json.dumps({"ranks": everyone, "topology": topology.as_dict()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
