"""Two rounds of the elastic agent exactly as ``ckpt-ledger train`` configures it; the second must start clean.

Round 0: both workers join a gloo group, rank 0 leaves a marker in the group's store,
and rank 1 dies (exit 1) after a barrier, so the agent restarts both. Round 1: rank 1
joins late, so that rank 0 looks up rank 1's gloo address before rank 1 publishes it;
if round 0's entries were still in the store, that lookup would find the dead worker's
address (connection refused, or both ends waiting to be connected to). Each worker
reports whether it still sees round 0's marker and the result of an all-reduce.

Prints one JSON object, ``{rank: {"round", "stale", "sum"}}``; exits 1 with the agent's
error if the restarted round fails.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

MARKER = "ckpt-ledger-test/round-0-was-here"


def worker() -> dict[str, object]:
    """One worker of one round (the elastic agent's entrypoint)."""
    import torch
    import torch.distributed as dist

    rank, restart = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if restart > 0 and rank == 1:
        time.sleep(1.5)
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    # A client of the store the group rendezvoused on (wherever the agent put it this round).
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=20))
    if restart == 0:
        if rank == 0:
            store.set(MARKER, "1")
        dist.barrier()
        if rank == 1:
            sys.stdout.flush()
            os._exit(1)  # a worker dies; the agent restarts the whole group
        dist.barrier()  # fails once rank 1 is gone; the agent stops this worker either way
    stale = store.check([MARKER])
    total = torch.ones(1)
    dist.all_reduce(total)
    dist.destroy_process_group()
    return {"round": restart, "stale": stale, "sum": float(total)}


def main() -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from trainer.launch import agent_launch_config

    try:
        results = elastic_launch(agent_launch_config(nproc=2, max_restarts=1), worker)()
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(f"rank {rank} failed: exit code {failure.exitcode}, {failure.message}", file=sys.stderr)
        return 1
    print(json.dumps({str(rank): value for rank, value in sorted(results.items())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
