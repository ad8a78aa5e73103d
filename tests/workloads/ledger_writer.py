"""A ledger-only workload for crash tests: checkpoints and retention, printing every acknowledged seq.

Run as ``python ledger_writer.py RUN_DIR N_CHECKPOINTS``. Each line on stdout is
``ack <seq> <tag>`` written (and flushed) right after an append returned, so the
parent knows exactly which events were acknowledged before a crash point fired.
"""

from __future__ import annotations

import os
import sys

from ledger import Ledger, RetentionPolicy
from ledger.events import AttemptEnded, ShardWritten, StepCompleted


def ack(seq: int | list[int], tag: str) -> None:
    for s in seq if isinstance(seq, list) else [seq]:
        print(f"ack {s} {tag}", flush=True)


def main(run_dir: str, checkpoints: int) -> None:
    led = Ledger.open(run_dir)
    view = led.projection()
    start = view.resume.step if view.resume else 0
    attempt = led.begin_attempt(world_size=2, stack="ddp", resumed_from=view.resume.checkpoint_id if view.resume else None)
    ack(attempt.seq, "attempt.started")
    # A restart first finishes whatever retention a crash interrupted.
    led.apply_retention(RetentionPolicy(keep_last=2), epoch=attempt.epoch)
    for step in range(start + 10, 10 * checkpoints + 1, 10):
        ack(led.append(StepCompleted(step=step), epoch=attempt.epoch), "step.completed")
        cid = f"ckpt-{step:06d}-e{attempt.epoch}"
        ack(led.begin_checkpoint(checkpoint_id=cid, step=step, ranks=[0, 1], world_size=2, stack="ddp",
                                 epoch=attempt.epoch), "checkpoint.started")
        for rank in (0, 1):
            payload = os.urandom(4096) + step.to_bytes(8, "little")
            info = led.blobs.write(f"{led.blobs.checkpoint_dir(cid, attempt.epoch)}/rank{rank}.bin", payload)
            ack(led.record_shards(cid, [ShardWritten(checkpoint_id=cid, rank=rank, location=info.location,
                                                     bytes=info.bytes, hash=info.hash, codec=info.codec)],
                                  epoch=attempt.epoch), "shard.written")
        ack(led.commit_checkpoint(cid, epoch=attempt.epoch), "checkpoint.committed")
        for deletion in led.apply_retention(RetentionPolicy(keep_last=2), epoch=attempt.epoch):
            print(f"deleted {deletion.checkpoint_id}", flush=True)
    ack(led.append(AttemptEnded(epoch=attempt.epoch, reason="completed", last_step=10 * checkpoints),
                   epoch=attempt.epoch), "attempt.ended")
    led.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
