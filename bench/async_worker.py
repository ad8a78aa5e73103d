"""Where a checkpoint's background work should run on 2 cores: a GIL-releasing thread or a process.

The performance issue leaves it open ("a process or GIL-releasing threads — measure which
is better on 2 cores"). Both variants do the same job on the same staged tensors, which
live in one shared-memory block so that a process reads them without a copy:

* serialize: a JSON header (name, dtype, shape, offset of every tensor), then the raw
  bytes back to back, written from the staging memory in 4 MiB chunks;
* hash: ``blake2b(digest_size=32)`` over every byte written (what ``shard.written`` records);
* fsync the file.

``hashlib`` and ``os.write`` release the GIL on large buffers, so the thread holds it only
between chunks; the process (spawned once, before timing, like a long-lived worker)
never shares the GIL but costs a process. Meanwhile the main thread runs a CPU-bound
training loop (an MLP, batch 16, AdamW, one intra-op thread: see ``TRAINING_THREADS``).

A trial trains while a few saves run back to back (the next starts as soon as one
ends), so it measures the training loop *while* a checkpoint is being written — one short
save in a long window would drown in the machine's noise; a no-save trial runs about as
long. Reported per variant: the step-time slowdown against the no-save trials, the
save's duration under that contention, and the training time lost per save (the trial's
extra time over the no-save step time, per save), which is what one checkpoint costs a
run. A calibration also times one save alone against the bare write + fsync of its bytes
(``detail.save_alone_vs_raw_write``: what hashing inline costs). Trials rotate (none,
thread, process), (thread, process, none), ... so load drifts hit all three.
Run alone: ``python bench/async_worker.py``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench._background_save import serve_saves, write_raw, write_staged
from bench.harness import Context, Record, benchmark, interleaved, median, spread

VARIANTS = ("none", "thread", "process")
#: The training loop is one busy core, as a GPU job's Python thread is; the other core is the
#: checkpoint's. (Two OpenMP threads on a shared 2-core box mostly measure a thread waiting
#: for its descheduled sibling: a 2-thread matmul ran 2.5-3x slower than a 1-thread one at load 4.)
TRAINING_THREADS = 1


class StagedTensors:
    """fp32 tensors in one shared-memory block, filled like trained weights (not zeros)."""

    def __init__(self, total_bytes: int, pieces: int = 24) -> None:
        numel = total_bytes // 4 // pieces
        self.shm = SharedMemory(create=True, size=numel * 4 * pieces)
        flat = torch.frombuffer(self.shm.buf, dtype=torch.float32)
        flat.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
        layout = [{"name": f"t{i}", "dtype": "float32", "shape": [numel], "offset": i * numel * 4,
                   "bytes": numel * 4} for i in range(pieces)]
        self.header = json.dumps(layout).encode()
        self.nbytes = numel * 4 * pieces
        del flat  # no tensor may outlive the mapping

    def view(self) -> memoryview:
        """The staged bytes."""
        return self.shm.buf[: self.nbytes]

    def close(self) -> None:
        """Release and remove the shared-memory block."""
        self.shm.close()
        self.shm.unlink()


class ThreadWorker:
    """Background saves on one long-lived thread."""

    def __init__(self, staged: StagedTensors) -> None:
        self._staged = staged
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-bg")
        self._future: Future | None = None

    def start(self, path: str) -> None:
        """Begin one save."""
        self._future = self._pool.submit(write_staged, self._staged.view(), self._staged.header, path)

    def done(self) -> bool:
        """Whether the save finished."""
        return self._future is not None and self._future.done()

    def result(self) -> tuple[str, float]:
        """Wait for the save; ``(digest, seconds)``."""
        if self._future is None:
            raise RuntimeError("no save was started")
        return self._future.result()

    def close(self) -> None:
        """Stop the thread."""
        self._pool.shutdown()


class ProcessWorker:
    """Background saves in one long-lived spawned process reading the shared staging block."""

    def __init__(self, staged: StagedTensors) -> None:
        context = multiprocessing.get_context("spawn")  # fork after torch's threads started is unsafe
        self._conn, child = context.Pipe()
        self._proc = context.Process(target=serve_saves, args=(child, staged.shm.name, staged.nbytes,
                                                                    staged.header), daemon=True)
        self._proc.start()
        child.close()
        if self._conn.recv() != "ready":
            raise RuntimeError("background checkpoint process did not start")
        self._reply: tuple[str, float] | None = None
        self._pending = False

    def start(self, path: str) -> None:
        """Begin one save."""
        self._reply, self._pending = None, True
        self._conn.send(path)

    def done(self) -> bool:
        """Whether the save finished."""
        if self._pending and self._conn.poll():
            self._reply, self._pending = self._conn.recv(), False
        return self._reply is not None

    def result(self) -> tuple[str, float]:
        """Wait for the save; ``(digest, seconds)``."""
        if self._pending:
            self._reply, self._pending = self._conn.recv(), False
        if self._reply is None:
            raise RuntimeError("no save was started")
        return self._reply

    def close(self) -> None:
        """Stop the process."""
        self._conn.send(None)
        self._proc.join(timeout=30)
        self._conn.close()


# -- the foreground loop ----------------------------------------------------------------------------


class TrainingLoop:
    """A CPU-bound training step: MLP forward, backward and AdamW on a fixed batch."""

    def __init__(self, width: int = 1024, layers: int = 4, batch: int = 16) -> None:
        torch.manual_seed(0)
        blocks: list[nn.Module] = []
        for _ in range(layers):
            blocks += [nn.Linear(width, width), nn.GELU()]
        self.model = nn.Sequential(*blocks, nn.Linear(width, 16))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.inputs = torch.randn(batch, width)
        self.targets = torch.randint(16, (batch,))

    def step(self) -> None:
        """One optimizer step."""
        loss = F.cross_entropy(self.model(self.inputs), self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def _trial(loop: TrainingLoop, worker: ThreadWorker | ProcessWorker | None, *, steps: int, saves: int,
           path: str) -> dict[str, Any]:
    """With a worker: train while ``saves`` saves run back to back; without: ``steps`` steps."""
    for _ in range(2):  # settle caches and the allocator after the previous trial
        loop.step()
    durations: list[float] = []
    done_steps = 0
    start = time.perf_counter()
    if worker is None:
        for done_steps in range(1, steps + 1):
            loop.step()
    else:
        worker.start(path)
        while len(durations) < saves:
            loop.step()
            done_steps += 1
            if worker.done():
                durations.append(worker.result()[1])
                if len(durations) < saves:
                    worker.start(path)
        os.unlink(path)
    elapsed = time.perf_counter() - start
    out: dict[str, Any] = {"steps": done_steps, "mean_step_s": elapsed / done_steps}
    if worker is not None:
        out.update(save_s=durations, lost_per_save_s=None)
    return out


@benchmark("async_worker_thread_vs_process")
def thread_vs_process(ctx: Context) -> list[Record]:
    rounds, saves = ctx.reps(3, 10), ctx.reps(2, 3)
    staged_mb = ctx.reps(64, 128)
    scratch = ctx.scratch("async-worker")
    staged = StagedTensors(staged_mb << 20)
    loop = TrainingLoop()
    workers: dict[str, ThreadWorker | ProcessWorker | None] = {"none": None}
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        workers["thread"] = ThreadWorker(staged)
        workers["process"] = ProcessWorker(staged)
        # Calibrate: a save alone, against the bare write+fsync of its bytes (what hashing inline costs);
        # the no-save trials run about as long as ``saves`` saves take alone.
        path = str(scratch / "calibrate.bin")
        alone, raw = interleaved(lambda: write_staged(staged.view(), staged.header, path),
                                 lambda: write_raw(staged.view(), path), 3)
        save_alone = median(alone)
        os.unlink(path)
        step_alone = _trial(loop, None, steps=5, saves=0, path=path)["mean_step_s"]
        steps = max(5, math.ceil(saves * save_alone / step_alone))
        ctx.log(f"{staged.nbytes / 1e6:.0f} MB save alone {save_alone:.2f}s (raw write {median(raw):.2f}s), "
                f"step alone {step_alone * 1e3:.0f} ms; "
                f"{saves} saves per trial, {steps} steps per no-save trial")
        trials: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for r in range(rounds):
            for variant in VARIANTS[r % 3:] + VARIANTS[: r % 3]:  # rotate who goes first
                trials[variant].append(_trial(loop, workers[variant], steps=steps, saves=saves,
                                              path=str(scratch / f"{variant}.bin")))
    finally:
        torch.set_num_threads(threads)
        for worker in workers.values():
            if worker is not None:
                worker.close()
        staged.close()

    step = {v: median([t["mean_step_s"] for t in trials[v]]) * 1e3 for v in VARIANTS}
    slow = {v: (step[v] / step["none"] - 1) * 100 for v in ("thread", "process")}
    save = {v: median([d for t in trials[v] for d in t["save_s"]]) for v in ("thread", "process")}
    for v in ("thread", "process"):  # what one save costs the run: the trial's extra time, per save
        for t in trials[v]:
            t["lost_per_save_s"] = (t["mean_step_s"] - step["none"] / 1e3) * t["steps"] / saves
    lost = {v: median([t["lost_per_save_s"] for t in trials[v]]) for v in ("thread", "process")}
    detail = {"training_threads": TRAINING_THREADS, "staged_bytes": staged.nbytes, "saves_per_trial": saves,
              "steps_per_no_save_trial": steps, "save_alone_s": spread(alone),
              "raw_write_alone_s": spread(raw), "save_alone_vs_raw_write": save_alone / median(raw),
              "step_alone_s": step_alone, "rounds": rounds, "trials": trials, "save_s": save,
              "training_s_lost_per_save": lost,
              "mean_step_ms": {v: spread([t["mean_step_s"] * 1e3 for t in trials[v]]) for v in VARIANTS}}
    what = f"{saves} saves of {staged.nbytes / 1e6:.0f} MB (serialize+blake2b+write+fsync) back to back"

    def one(v: str) -> str:
        return f"+{slow[v]:.1f}%, save {save[v]:.2f}s, {lost[v]:.2f}s of training lost per save"

    return [
        Record.of("async_worker_thread_slowdown", step["thread"], step["none"], "ms/step",
                  note=f"step time with a background thread saving vs none: {one('thread')}; {what}", detail=detail),
        Record.of("async_worker_process_slowdown", step["process"], step["none"], "ms/step",
                  note=f"step time with a background process saving vs none: {one('process')}; {what}",
                  detail=detail),
        Record.of("async_worker_thread_vs_process", step["thread"], step["process"], "ms/step",
                  note=f"step time, thread worker vs process worker: thread {one('thread')}; "
                       f"process {one('process')}", detail=detail),
    ]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.harness import run_module

    sys.exit(run_module(__file__))
