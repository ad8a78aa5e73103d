"""One attempt that commits a first checkpoint, then tries a second one under an injected I/O fault.

The documented behaviour under test: a failed shard write or fsync aborts that
checkpoint (``checkpoint.aborted`` with the error), is never retried hoping it
worked, and the writer stops with a one-line message (exit 3 here). A failed
ledger append leaves nothing half-written: the caller sees LedgerWriteError.
Prints ``ack <seq> <tag>`` after each acknowledged append.
"""

from __future__ import annotations

import os
import sys

from ledger import Ledger, LedgerError
from ledger.events import ShardWritten, StepCompleted


def ack(seqs, tag):
    for s in seqs if isinstance(seqs, list) else [seqs]:
        print(f"ack {s} {tag}", flush=True)


def checkpoint(led, epoch, step):
    cid = f"ckpt-{step:06d}-e{epoch}"
    ack(led.begin_checkpoint(checkpoint_id=cid, step=step, ranks=[0], world_size=1, stack="ddp", epoch=epoch),
        "checkpoint.started")
    try:
        info = led.blobs.write(f"{led.blobs.checkpoint_dir(cid, epoch)}/rank0.bin", os.urandom(1 << 16))
    except LedgerError as err:
        ack(led.abort_checkpoint(cid, f"shard write failed: {err}", epoch=epoch), "checkpoint.aborted")
        raise
    ack(led.record_shards(cid, [ShardWritten(checkpoint_id=cid, rank=0, location=info.location, bytes=info.bytes,
                                             hash=info.hash, codec=info.codec)], epoch=epoch), "shard.written")
    ack(led.commit_checkpoint(cid, epoch=epoch), "checkpoint.committed")


def main(run_dir: str) -> int:
    led = Ledger.open(run_dir)
    attempt = led.begin_attempt()
    ack(attempt.seq, "attempt.started")
    try:
        checkpoint(led, attempt.epoch, 10)
        os.environ["FAULT_ARMED"] = "1"
        print("armed", flush=True)
        for step in range(11, 200):
            ack(led.append(StepCompleted(step=step), epoch=attempt.epoch), "step.completed")
            if step % 20 == 0:
                checkpoint(led, attempt.epoch, step)
    except LedgerError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
