"""The kill loop's writer, and a small fork server that starts it.

:func:`writer_forever` runs the full checkpoint protocol (blob writes, shard records,
commit, retention) until it is SIGKILLed, acknowledging every append on a pipe.

Why a fork server: forking the writer straight from the pytest process copies the page
tables of everything the suite has loaded (torch, Lightning, transformers: ~0.5 GB) and
the child's first garbage collection touches that whole heap; each kill cost ~0.12 s in
the full suite against ~0.06 s from a fresh interpreter. This server is a fresh
interpreter that imports the ledger only and forks one writer per request, so every kill
still hits a real process at a random moment of the protocol, for half the price.

Protocol on the Unix socket given as ``argv[1]`` (one request, one reply):

* ``spawn SEED RUN_DIR`` with the pipe's write end attached (``SCM_RIGHTS``) -> ``pid PID``
* ``wait PID`` -> ``status STATUS`` (``os.waitpid``'s status word; only the parent may reap)
"""

from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

from ledger import Ledger, RetentionPolicy
from ledger.events import ShardWritten, StepCompleted

POLICY = RetentionPolicy(keep_last=2)


def writer_forever(run_dir: Path, ack_fd: int, seed: int) -> None:
    """Resume from the projection and checkpoint forever, acknowledging each append on ``ack_fd``."""
    rng = random.Random(seed)

    def ack(seqs, tag):
        for s in seqs if isinstance(seqs, list) else [seqs]:
            os.write(ack_fd, f"{s} {tag}\n".encode())

    led = Ledger.open(run_dir)
    view = led.projection()
    step = view.resume.step if view.resume else 0
    attempt = led.begin_attempt(world_size=2, resumed_from=view.resume.checkpoint_id if view.resume else None)
    ack(attempt.seq, "attempt.started")
    led.apply_retention(POLICY, epoch=attempt.epoch)
    while True:
        step += 1
        ack(led.append(StepCompleted(step=step), epoch=attempt.epoch), "step.completed")
        if step % 3:
            continue
        cid = f"c{step}-e{attempt.epoch}"
        ack(led.begin_checkpoint(checkpoint_id=cid, step=step, ranks=[0, 1], world_size=2, stack="ddp",
                                 epoch=attempt.epoch), "checkpoint.started")
        for rank in (0, 1):
            info = led.blobs.write(f"{led.blobs.checkpoint_dir(cid, attempt.epoch)}/r{rank}",
                                   rng.randbytes(rng.randint(1, 20000)), codec=rng.choice(["none", "zstd"]))
            ack(led.record_shards(cid, [ShardWritten(checkpoint_id=cid, rank=rank, location=info.location,
                                                     bytes=info.bytes, hash=info.hash, codec=info.codec)],
                                  epoch=attempt.epoch), "shard.written")
        ack(led.commit_checkpoint(cid, epoch=attempt.epoch), "checkpoint.committed")
        led.apply_retention(POLICY, epoch=attempt.epoch)


def serve(sock: socket.socket) -> None:
    """Answer requests until the test closes its end of the socket."""
    while True:
        message, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        if not message:
            return
        command, _, rest = message.decode().partition(" ")
        if command == "spawn":
            seed, _, run_dir = rest.partition(" ")
            pid = os.fork()
            if pid == 0:  # the writer: never returns
                try:
                    sock.close()
                    writer_forever(Path(run_dir), fds[0], seed=int(seed))
                finally:
                    os._exit(1)
            os.close(fds[0])  # the writer holds the only write end now: EOF when it dies
            sock.sendall(f"pid {pid}".encode())
        elif command == "wait":
            _, status = os.waitpid(int(rest), 0)
            sock.sendall(f"status {status}".encode())
        else:
            raise ValueError(f"unknown request {message!r}")


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
