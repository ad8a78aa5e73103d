"""``ckpt-ledger train``: run the embedded default job, recording every fact in the run's ledger."""

from __future__ import annotations

import os
import sys

import click

from cli.errors import EXIT_USAGE, CliError
from cli.options import duration_option

STACK_CHOICES = ("ddp", "fsdp", "tppp")


@click.command("train")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False), help="Run directory (created if missing), or a run in PostgreSQL: postgresql://USER@HOST:PORT/DB?run=NAME.")
@click.option("--stack", type=click.Choice(STACK_CHOICES), default="ddp", show_default=True, help="Parallelism stack.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True, help="Local worker processes.")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True, help="Tensor-parallel degree (tppp).")
@click.option("--pp", type=click.IntRange(min=1), default=1, show_default=True, help="Pipeline-parallel degree (tppp).")
@click.option("--pp-schedule", type=click.Choice(("1F1B", "GPipe")), default="1F1B", show_default=True,
              help="Pipeline schedule (tppp with --pp > 1).")
@click.option("--pp-microbatches", type=click.IntRange(min=1), default=None,
              help="Microbatches per step (tppp; default: one per pipeline stage).")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="The run's TOTAL step target; a resumed run continues to it.")
@click.option("--ckpt-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Commit a checkpoint every N steps (and at the last step).")
@click.option("--eval-every", type=click.IntRange(min=0), default=50, show_default=True,
              help="Record eval_loss every N steps (0: never).")
@click.option("--keep-last", type=click.IntRange(min=0), default=None, help="Retention: keep the K newest checkpoints.")
@click.option("--keep-every", type=click.IntRange(min=1), default=None, help="Retention: keep steps divisible by N.")
@click.option("--keep-best", type=click.IntRange(min=0), default=None, help="Retention: keep the K best by eval_loss.")
@click.option("--ckpt-every-seconds", callback=duration_option, default=None, metavar="DURATION",
              help="Also commit a checkpoint once DURATION (e.g. 600, 30m) passed since the last one.")
@click.option("--keep-every-seconds", callback=duration_option, default=None, metavar="DURATION",
              help="Retention: keep the first checkpoint of each DURATION of wall-clock time, e.g. 6h.")
@click.option("--keep-for", callback=duration_option, default=None, metavar="DURATION",
              help="Retention: keep every checkpoint committed less than DURATION ago, e.g. 7d.")
@click.option("--keep-without-metric", is_flag=True, default=False,
              help="Retention: with --keep-best, also keep checkpoints that have no eval_loss.")
@click.option("--resume", "resume", metavar="ID|latest|best", default=None,
              help="Resume from this checkpoint; missing or invalid is an error, never a fresh start.")
@click.option("--pretrained", type=click.Path(dir_okay=False), default=None,
              help="Initialise model weights from a torch state-dict file when nothing is resumed.")
@click.option("--seed", type=click.IntRange(min=0, max=2**32 - 1), default=0, show_default=True, help="Random seed.")
@click.option("--max-restarts", type=click.IntRange(min=0), default=0, show_default=True,
              help="Restart all workers up to N times after a worker dies (each restart resumes).")
@click.option("--codec", type=click.Choice(("none", "zstd", "zstd-bg")), default="none", show_default=True,
              help="How checkpoint files store tensors: plain, zstd, or byte-grouped zstd (smaller floats).")
@click.option("--blobs", default=None, metavar="DIR|URL",
              help="Where checkpoint shards go: a directory or an fsspec URL such as s3://bucket/prefix "
                   "(default: the run directory). Endpoint and keys come from AWS_ENDPOINT_URL, "
                   "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws or fsspec config, never from the URL.")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes in the job: run this command once per node, each starting --nproc workers.")
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="This node's number (0..nnodes-1); node 0 hosts the rendezvous at --rdzv-endpoint.")
@click.option("--rdzv-endpoint", metavar="HOST:PORT", default=None,
              help="Where the nodes meet (on node 0, reachable from every node); required with --nnodes > 1.")
@click.option("--rdzv-id", default=None, help="Rendezvous id, the same on every node (default: ckpt-ledger).")
@click.option("--local-addr", default=None,
              help="The address other nodes reach this node at (default: its fully qualified host name).")
@click.option("--sync-checkpoint", "sync_checkpoint", is_flag=True, default=False,
              help="Block training for every checkpoint (default: periodic ones are written in the background).")
def train_command(run_dir: str, stack: str, nproc: int, tp: int, pp: int, pp_schedule: str,
                  pp_microbatches: int | None, steps: int, ckpt_every: int,
                  eval_every: int, keep_last: int | None, keep_every: int | None, keep_best: int | None,
                  resume: str | None, pretrained: str | None, seed: int, max_restarts: int,
                  codec: str, blobs: str | None, nnodes: int, node_rank: int, rdzv_endpoint: str | None,
                  rdzv_id: str | None,
                  local_addr: str | None, sync_checkpoint: bool, ckpt_every_seconds: float | None = None,
                  keep_every_seconds: float | None = None, keep_for: float | None = None,
                  keep_without_metric: bool = False) -> None:
    """Train the embedded default job (a tiny transformer LM on generated text).

    Exits 0 when the run reaches --steps, 75 when preempted (SIGTERM/SIGUSR1) after
    saving its state, 1 when the ledger says no (fenced, --resume of a missing
    checkpoint), 2 on bad input. The same command runs under `torchrun -m trainer`
    and SLURM `srun` (one task per rank, or one task per node with --nproc).
    Multi-node: run it on every node with the same --nnodes and --rdzv-endpoint;
    the run directory must be the same shared directory everywhere.

    \b
    Example:
      ckpt-ledger train --run-dir runs/exp1 --stack fsdp --nproc 2 --steps 300
      ckpt-ledger train --run-dir runs/exp1 --resume latest --steps 600
      ckpt-ledger train --run-dir runs/exp2 --stack tppp --tp 2 --pp 2 --nproc 4
      ckpt-ledger train --run-dir /shared/exp3 --nproc 4 --nnodes 2 --node-rank 0 --rdzv-endpoint node01:29500
      AWS_ENDPOINT_URL=http://127.0.0.1:8333 ckpt-ledger train --run-dir runs/exp3 --blobs s3://ckpts/exp3
    """
    # Imported here: torch is heavy and only `train` needs it.
    import torch

    from trainer.config import TrainerConfig
    from trainer.default_job import JobSpec, default_job
    from trainer.launch import launch, plan_launch
    from trainer.rendezvous import DEFAULT_RDZV_ID, NodeRendezvous
    from trainer.stacks import PLANNED_STACKS, Topology, get_stack

    nodes = None
    try:
        if nnodes > 1 or rdzv_endpoint is not None:
            if rdzv_endpoint is None:
                raise ValueError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT "
                                 "(where node 0 hosts the rendezvous)")
            nodes = NodeRendezvous(nnodes=nnodes, node_rank=node_rank, endpoint=rdzv_endpoint,
                                   run_id=rdzv_id or DEFAULT_RDZV_ID, local_addr=local_addr)
        elif node_rank or rdzv_id or local_addr:
            raise ValueError("--node-rank/--rdzv-id/--local-addr need --nnodes N --rdzv-endpoint HOST:PORT")
        world = plan_launch(os.environ, nproc=nproc, max_restarts=max_restarts, nodes=nodes).world_size
    except ValueError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    try:
        topology = Topology.resolve(world, tp=tp, pp=pp)
    except ValueError as err:
        raise CliError(f"--tp {tp} --pp {pp}: {err} (--nproc {world})", EXIT_USAGE) from None
    if stack in PLANNED_STACKS:
        raise CliError(f"--stack {stack} (tp={topology.tp} pp={topology.pp} dp={topology.dp}) is valid but "
                       f"not implemented yet: {PLANNED_STACKS[stack]}", EXIT_USAGE)
    try:
        get_stack(stack).topology(world, tp=tp, pp=pp)
    except ValueError as err:
        raise CliError(f"--stack {stack}: {err}", EXIT_USAGE) from None
    if blobs is not None and "://" not in blobs:
        blobs = os.path.abspath(blobs)  # recorded for read commands run from anywhere
    try:
        config = TrainerConfig(
            run_dir=run_dir, stack=stack, tp=tp, pp=pp, pp_schedule=pp_schedule, pp_microbatches=pp_microbatches,
            steps=steps, ckpt_every=ckpt_every, eval_every=eval_every,
            keep_last=keep_last, keep_every=keep_every, keep_best=keep_best, resume=resume, pretrained=pretrained,
            ckpt_every_seconds=ckpt_every_seconds, keep_every_seconds=keep_every_seconds, keep_for=keep_for,
            keep_without_metric=keep_without_metric,
            seed=seed, async_checkpoint=not sync_checkpoint, checkpoint_codec=codec, blobs=blobs,
            job=JobSpec().as_dict(),
        )
    except ValueError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    # The stack checks its limits and that the job's model splits this way before any process starts.
    # The model is built on the meta device: shapes only, no compute in the launcher, which forks
    # its workers (OpenMP's thread pool does not survive a fork).
    try:
        chosen = get_stack(stack, config)
        with torch.device("meta"):
            model = default_job(JobSpec())[0]()
        chosen.check_model(model, chosen.topology(world, tp=tp, pp=pp))
    except ValueError as err:
        raise CliError(f"--stack {stack} --tp {tp} --pp {pp} (--nproc {world}): {err}", EXIT_USAGE) from None
    outcome = launch(config.to_dict(), nproc=nproc, max_restarts=max_restarts, nodes=nodes)
    if outcome.exit_code != 0:
        # Under torchrun/srun every rank returns the same outcome: rank 0 alone says it.
        if outcome.message and os.environ.get("RANK", "0") == "0":
            click.echo(f"ckpt-ledger: {'error: ' if outcome.exit_code != 75 else ''}{outcome.message}", err=True)
        sys.exit(outcome.exit_code)
