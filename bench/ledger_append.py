"""Appending to the ledger vs the raw I/O underneath it (issue 2's done-criterion).

* ``ledger_append_batched`` — ``append_many`` of 1,000 ``step.completed`` events per
  transaction (the read model folded and written in the same transaction) vs writing
  the same JSON payloads (newline-joined) to a file and fsyncing.
* ``ledger_append_single`` — one ``append`` (its own fenced, durable transaction) vs
  write + fsync of that one payload.
* ``ledger_commit_vs_fsync`` — ``commit_checkpoint`` (the rank check and the fence in
  one ``BEGIN IMMEDIATE`` transaction, ``synchronous=FULL``) vs write + fsync of the
  same payload size.

The baseline is the floor any durable log pays: the bytes plus one fsync. Both sides
write to the same file system in the same run. Run alone: ``python bench/ledger_append.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from bench.harness import Context, Record, benchmark, interleaved, median, spread, time_once
from ledger import Ledger
from ledger.events import CheckpointCommitted, ShardWritten, StepCompleted, encode

BATCH = 1000


def _steps(first: int, n: int) -> list[StepCompleted]:
    return [StepCompleted(step=s, metrics={"loss": 2.0 / (s + 1), "lr": 3e-4, "grad_norm": 0.7}) for s in
            range(first, first + n)]


def _payload(events: list[Any]) -> bytes:
    return b"".join(encode(e) + b"\n" for e in events)


class RawLog:
    """The baseline: an append-only file, fsynced after every write."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, data: bytes) -> None:
        os.write(self._fd, data)
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def _open_run(ctx: Context, name: str, prefill: int) -> tuple[Ledger, int, RawLog]:
    run_dir = ctx.scratch(name)
    led = Ledger.open(run_dir)
    led.start_run(run_id=name, config={})
    epoch = led.begin_attempt(world_size=1, stack="ddp").epoch
    # A log that already holds a run's worth of events: appends into a tiny table flatter the ledger.
    for first in range(0, prefill, 20_000):
        led.append_many(_steps(first, min(20_000, prefill - first)), epoch=epoch)
    return led, epoch, RawLog(run_dir / "raw.log")


@benchmark("ledger_append_batched")
def append_batched(ctx: Context) -> list[Record]:
    reps, prefill = ctx.reps(15, 40), ctx.reps(20_000, 200_000)
    led, epoch, raw = _open_run(ctx, "append-batched", prefill)
    batches = iter([_steps(prefill + i * BATCH, BATCH) for i in range(reps)])
    payloads = iter([_payload(_steps(prefill + i * BATCH, BATCH)) for i in range(reps)])
    ours_t, base_t = interleaved(lambda: led.append_many(next(batches), epoch=epoch),
                                 lambda: raw.append(next(payloads)), reps)
    led.close()
    raw.close()
    ours, base = median(ours_t) / BATCH * 1e6, median(base_t) / BATCH * 1e6
    return [Record.of(
        "ledger_append_batched", ours, base, "us/event", goal=">= 150k events/s", met=1e6 / ours >= 150_000,
        note=f"append_many of {BATCH} step.completed: {1e6 / ours:,.0f} events/s vs raw write+fsync "
             f"{1e6 / base:,.0f} events/s (log prefilled with {prefill:,} events)",
        detail={"batch": BATCH, "prefill": prefill, "events_per_s": 1e6 / ours, "baseline_events_per_s": 1e6 / base,
                "ours_s_per_batch": spread(ours_t), "baseline_s_per_batch": spread(base_t)},
    )]


@benchmark("ledger_append_single")
def append_single(ctx: Context) -> list[Record]:
    reps = ctx.reps(30, 100)
    led, epoch, raw = _open_run(ctx, "append-single", ctx.reps(20_000, 200_000))
    events = iter(_steps(10**9, reps))
    payload = _payload(_steps(10**9, 1))
    ours_t, base_t = interleaved(lambda: led.append(next(events), epoch=epoch), lambda: raw.append(payload), reps)
    led.close()
    raw.close()
    return [Record.of(
        "ledger_append_single", median(ours_t) * 1e3, median(base_t) * 1e3, "ms",
        note=f"one fenced append (own transaction, synchronous=FULL) vs write+fsync of its {len(payload)} bytes",
        detail={"payload_bytes": len(payload), "ours_s": spread(ours_t), "baseline_s": spread(base_t)},
    )]


@benchmark("ledger_commit_vs_fsync")
def commit_vs_fsync(ctx: Context) -> list[Record]:
    reps = ctx.reps(30, 100)
    led, epoch, raw = _open_run(ctx, "commit", ctx.reps(20_000, 200_000))
    payload = _payload([CheckpointCommitted(checkpoint_id="ckpt-000000000", step=0)])
    ours_t, base_t = [], []
    for i in range(reps):
        cid = f"ckpt-{i:09d}"
        # Phase 1 and the shard records are set up untimed: the commit is what a rank-0 waits on.
        led.begin_checkpoint(checkpoint_id=cid, step=i, ranks=[0, 1], world_size=2, stack="ddp", epoch=epoch)
        led.record_shards(cid, [ShardWritten(checkpoint_id=cid, rank=r, location=f"blobs/{cid}/e{epoch}/rank{r}.bin",
                                             bytes=1 << 20, hash="blake2b:" + "0" * 64, codec="zstd") for r in (0, 1)],
                          epoch=epoch)
        timed = [(lambda: led.commit_checkpoint(cid, epoch=epoch), ours_t), (lambda: raw.append(payload), base_t)]
        for fn, sink in (timed if i % 2 == 0 else timed[::-1]):
            sink.append(time_once(fn))
    led.close()
    raw.close()
    return [Record.of(
        "ledger_commit_vs_fsync", median(ours_t) * 1e3, median(base_t) * 1e3, "ms",
        note=f"commit_checkpoint (rank check + fence + insert, one transaction) vs write+fsync of {len(payload)} bytes",
        detail={"payload_bytes": len(payload), "ours_s": spread(ours_t), "baseline_s": spread(base_t)},
    )]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.harness import run_module

    sys.exit(run_module(__file__))
