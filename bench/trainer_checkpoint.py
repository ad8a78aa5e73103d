"""Checkpointing in the trainer vs what a user would otherwise do (the performance issue's trainer rows).

Ours is :class:`trainer.Trainer` itself, one in-process rank on a 1-rank gloo group
(what ``ckpt-ledger train --nproc 1`` runs), stack ``ddp``, no evaluation, asynchronous
checkpoints; its numbers are the trainer's own ``checkpoint_timings``. The job is a
:class:`WideMLP`: a few square ``Linear`` layers on a batch of 4, so the state is large
and a step is cheap (AdamW keeps two moments per parameter: 33.6M parameters are
134 MB of weights + 269 MB of moments = 403 MB; 57 MB with ``--quick``).

* ``stall_vs_torch_save`` — how long a checkpoint holds the training thread (gathering
  the state dicts and the snapshot into reused staging buffers; ``checkpoint.started`` and
  everything after it happen on the writer thread; steady state, the first checkpoint also
  allocates the buffers) vs ``torch.save`` of the same model and optimizer state dicts to
  a file plus ``fsync``.
* ``stall_vs_memcpy`` — the same stall vs copying the same tensors into buffers allocated
  once: the physical floor of a snapshot.
* ``stall_vs_dcp_async_save`` — the same stall vs the time until
  ``torch.distributed.checkpoint.async_save`` returns its future, with a long-lived
  ``DefaultStager`` (DCP's staging buffers reused too; on CPU that is DCP's best case).
* ``commit_vs_raw_write`` — from the start of a checkpoint to ``checkpoint.committed``
  appended (written, hashed, fsynced, reported, committed, while training goes on) vs
  one sequential write + ``fsync`` of the same number of bytes to one file;
  ``commit_sync_vs_raw_write`` the same for the final, synchronous checkpoint.
* ``async_peak_extra_memory`` — how much the process's resident set grows from the first
  checkpoint on (staging buffers, writer), vs the state size.
* ``resume_load_vs_raw_read`` (in ``bench/resume_load.py``) — verifying (hashing every shard) and loading the resume
  checkpoint into the model's and optimizer's state dicts vs reading the same files into
  one preallocated buffer.
* ``step_overhead`` (in ``bench/step_overhead.py``) — mean step time of a run checkpointing every ``N`` steps vs the
  same run checkpointing only at the end, over the same steps (the final checkpoint
  excluded); ``step_overhead_sync`` is the same with synchronous checkpoints, and
  ``lost_training_async_vs_sync`` the training time one checkpoint costs, async vs sync.
  Other jobs on the box shift whole runs' step times by tens of percent, far more than
  the effect, so each run is read against itself: steps away from every checkpoint
  count at the run's median step time, steps where a checkpoint stalls or is written
  count as measured (see :func:`relative_mean_step`); the raw means are in ``detail``.

The stall, commit and memory rows share one session: rounds of (a training run, then the three
baselines), the order flipped every round. Every process-wide setting touched (the
``MASTER_*``/``RANK`` environment, torch's intra-op threads) is restored afterwards.
Run alone: ``python bench/trainer_checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import mmap
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict

from bench._background_save import write_raw
from bench._checkpoint_floors import PreallocatedCopy, RssSampler, write_raw_direct
from bench.harness import Context, Record, benchmark, median, spread, time_once
from ledger import LocalBlobStore
from trainer import Trainer, TrainerConfig
from trainer.checkpointing import CheckpointTiming
from trainer.process_group import free_port

VOCAB, BATCH = 16, 4
#: The training thread is one busy core, as a GPU job's Python thread is (and as in
#: ``bench/async_worker.py``); the other core is left to the checkpoint's background work.
TRAINING_THREADS = 1


# -- the job -----------------------------------------------------------------------------------------


class WideMLP(nn.Module):
    """``layers`` square Linear layers and a small classification head: big state, cheap steps."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
        self.head = nn.Linear(width, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, VOCAB)``."""
        return self.head(F.relu(self.body(x)))


class TimedBatches:
    """One fixed batch, forever; every ``next_batch`` call notes the time (consecutive calls bracket a step)."""

    def __init__(self, width: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(BATCH, width, generator=gen)
        self.targets = torch.randint(VOCAB, (BATCH,), generator=gen)
        self.position = 0
        self.marks: list[float] = []

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch; ``marks[k]`` is when step ``k + 1`` began."""
        self.marks.append(time.perf_counter())
        self.position += 1
        return self.inputs, self.targets

    def state_dict(self) -> dict[str, int]:
        """The data position."""
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position."""
        self.position = int(state["position"])


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model size of one benchmark."""

    width: int
    layers: int

    def state_bytes(self) -> int:
        """fp32 weights plus AdamW's two moments."""
        params = self.layers * (self.width * self.width + self.width) + self.width * VOCAB + VOCAB
        return 3 * 4 * params


@dataclasses.dataclass
class RunResult:
    """What one training run measured."""

    timings: list[CheckpointTiming]
    marks: list[float]
    """``marks[k]``: when step ``k + 1`` began."""
    wall_s: float
    rss: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    """``(time, resident bytes)`` of this process, sampled through the run."""

    def peak_extra_rss(self, after_step: int) -> int:
        """Highest resident size from the start of step ``after_step`` on, over the highest of the steps before.

        The steps before it (from step 2, the first with optimizer state) are training alone —
        gradients and optimizer temporaries come and go every step — so the difference is
        what checkpointing added.
        """
        start, training_from = self.marks[after_step - 1], self.marks[1]
        before = [b for t, b in self.rss if training_from <= t <= start]
        later = [b for t, b in self.rss if t >= start]
        return max(later) - max(before) if before and later else 0


@contextlib.contextmanager
def single_rank_process(threads: int = TRAINING_THREADS) -> Iterator[None]:
    """A lone rank on loopback (fresh port per process group) and ``threads`` intra-op threads; undone on exit."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved_env = {k: os.environ.get(k) for k in keys}
    saved_threads = torch.get_num_threads()
    os.environ.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train(run_dir: Path, shape: Shape, *, steps: int, ckpt_every: int, async_checkpoint: bool,
          keep: bool = False) -> RunResult:
    """One fresh run of the trainer on ``WideMLP(shape)``; the run directory is removed afterwards unless ``keep``."""
    made: list[TimedBatches] = []

    def data_fn(dp_rank: int, dp_size: int, seed: int, device: torch.device) -> TimedBatches:
        made.append(TimedBatches(shape.width, seed + dp_rank))
        return made[-1]

    options: dict[str, Any] = {}
    if any(f.name == "checkpoint_codec" for f in dataclasses.fields(TrainerConfig)):
        options["checkpoint_codec"] = "none"  # raw bytes on both sides of every comparison
    config = TrainerConfig(run_dir=str(run_dir), stack="ddp", steps=steps, ckpt_every=ckpt_every, eval_every=0,
                           print_every=0, warmup_steps=1, async_checkpoint=async_checkpoint, **options)
    os.environ["MASTER_PORT"] = str(free_port())
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), RssSampler() as rss:  # "checkpoint ... committed" lines
        trainer = Trainer(config, model_fn=lambda: WideMLP(shape.width, shape.layers), data_fn=data_fn)
        outcome = trainer.fit()
    wall = time.perf_counter() - started
    if not keep:
        shutil.rmtree(run_dir)
    if outcome.status != "completed" or not all(t.committed for t in trainer.checkpoint_timings):
        raise RuntimeError(f"benchmark run did not complete cleanly: {outcome}, {trainer.checkpoint_timings}")
    return RunResult(list(trainer.checkpoint_timings), made[0].marks, wall, rss.samples)


# -- baselines ---------------------------------------------------------------------------------------


def baseline_state(shape: Shape) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same model and an AdamW that has taken one step (so both moments exist)."""
    torch.manual_seed(0)
    model = WideMLP(shape.width, shape.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = TimedBatches(shape.width, 0)
    F.cross_entropy(model(data.inputs), data.targets).backward()
    optimizer.step()
    return model, optimizer


def torch_save_fsync(state: dict[str, Any], path: Path) -> None:
    """What a user without a checkpoint library writes: ``torch.save`` then ``fsync``."""
    with open(path, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())


class DcpAsyncSave:
    """``dcp.async_save`` on a 1-rank gloo group, with one long-lived stager (buffers reused across saves)."""

    def __init__(self, state: dict[str, Any], directory: Path) -> None:
        self.state = state
        self.directory = directory
        # DCP's default stager for a FileSystemWriter allocates fresh CPU copies every save, and its
        # caching option pins memory (CUDA only); a caller-owned DefaultStager caches on CPU.
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                   use_async_staging=False, use_non_blocking_copy=False))
        self.total_s: list[float] = []

    def stall(self) -> float:
        """Seconds until ``async_save`` returns; then waits (untimed) for the write to finish."""
        writer = FileSystemWriter(self.directory, single_file_per_rank=True, sync_files=True, overwrite=True)
        start = time.perf_counter()
        future = dcp.async_save(self.state, storage_writer=writer, async_stager=self.stager)
        stall = time.perf_counter() - start
        future.result()
        self.total_s.append(time.perf_counter() - start)
        return stall

    def close(self) -> None:
        """Free the stager's buffers."""
        self.stager.close()


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """A 1-rank gloo group for the DCP baseline (the trainer makes and destroys its own)."""
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


# -- session: stall and commit -----------------------------------------------------------------------


@dataclasses.dataclass
class Session:
    """Interleaved samples of the trainer and the baselines, on one state size."""

    shape: Shape
    ckpt_every: int
    runs: list[RunResult]
    samples: dict[str, list[float]]
    """Baseline seconds: ``torch_save``, ``dcp_stall``, ``raw_write``; components ``dcp_hash``, ``get_state_dict``."""
    dcp_total_s: list[float]
    raw_bytes: int

    def steady(self) -> list[CheckpointTiming]:
        """Asynchronous checkpoints after each run's first (which allocates the staging buffers)."""
        return [t for run in self.runs for t in [t for t in run.timings if not t.synchronous][1:]]

    def first(self) -> list[CheckpointTiming]:
        """Each run's first asynchronous checkpoint."""
        return [[t for t in run.timings if not t.synchronous][0] for run in self.runs]

    def final(self) -> list[CheckpointTiming]:
        """Each run's final (synchronous) checkpoint."""
        return [t for run in self.runs for t in run.timings if t.synchronous]

    def late(self) -> int:
        """Asynchronous checkpoints still being written when training reached the next checkpoint step."""
        count = 0
        for run in self.runs:
            for t in run.timings:
                if not t.synchronous and t.durable_s is not None:
                    # From the start of step ``t.step`` to the start of step ``t.step + ckpt_every``.
                    window = run.marks[t.step + self.ckpt_every - 1] - run.marks[t.step - 1]
                    count += t.durable_s > window
        return count


_SESSIONS: dict[tuple[bool, Path], Session] = {}


def session(ctx: Context) -> Session:
    """Run (once per benchmark run) the interleaved session the stall and commit rows share."""
    key = (ctx.quick, ctx.workdir)
    if key not in _SESSIONS:
        _SESSIONS[key] = _run_session(ctx)
    return _SESSIONS[key]


def _run_session(ctx: Context) -> Session:
    # Quick: 57 MB of state, 2 rounds; full: 403 MB, 3 rounds. Each run takes 3 asynchronous
    # checkpoints (2 in the steady state) and a final synchronous one; the interval leaves the
    # background save room to finish before the next checkpoint (checked: ``Session.late``).
    shape = Shape(width=ctx.reps(768, 2048), layers=8)
    rounds, ckpt_every, ckpts = ctx.reps(2, 3), ctx.reps(8, 10), 3
    scratch = ctx.scratch("trainer-ckpt")
    model, optimizer = baseline_state(shape)
    plain = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    model_sd, optim_sd = get_state_dict(model, optimizer)  # DCP's own (fully qualified) form of the same state
    dcp_save = DcpAsyncSave({"model": model_sd, "optim": optim_sd}, scratch / "dcp")
    blobs = LocalBlobStore(scratch)
    raw_source = memoryview(torch.randn(shape.state_bytes() // 4 + (1 << 20)).numpy().view("uint8"))
    runs: list[RunResult] = []
    samples: dict[str, list[float]] = {k: [] for k in ("torch_save", "dcp_stall", "dcp_hash", "raw_write",
                                                        "get_state_dict", "memcpy", "raw_write_direct")}
    # An aligned copy of the raw source for the O_DIRECT context figure (lengths rounded to a block).
    direct_source = mmap.mmap(-1, -(-len(raw_source) // 4096) * 4096)
    direct_source[:len(raw_source)] = raw_source
    memcpy = PreallocatedCopy(plain)
    memcpy()  # untimed: first touch of the destination pages
    raw_bytes = shape.state_bytes()  # replaced by what the trainer wrote, once known

    def ours() -> None:
        nonlocal raw_bytes
        runs.append(train(scratch / f"run{len(runs)}", shape, steps=ckpt_every * (ckpts + 1),
                          ckpt_every=ckpt_every, async_checkpoint=True))
        raw_bytes = int(median([t.bytes for t in runs[-1].timings]))
        ctx.log(f"run {len(runs)}: {runs[-1].wall_s:.1f}s, peak extra RSS "
                f"{runs[-1].peak_extra_rss(ckpt_every) / 1e6:.0f} MB, stall/durable "
                + " ".join(f"{t.stall_s * 1e3:.0f}/{(t.durable_s or 0) * 1e3:.0f}" for t in runs[-1].timings) + " ms")

    def baselines() -> None:
        with process_group():
            for _ in range(2):
                samples["torch_save"].append(time_once(lambda: torch_save_fsync(plain, scratch / "torch_save.pt")))
                samples["dcp_stall"].append(dcp_save.stall())
                # A component of ours, for the notes: reading back and hashing what DCP wrote.
                samples["dcp_hash"].append(time_once(
                    lambda: [blobs.hash_file(f"dcp/{p.name}") for p in (scratch / "dcp").iterdir()]))
                raw = raw_source[:raw_bytes]
                samples["raw_write"].append(time_once(lambda: write_raw(raw, str(scratch / "raw.bin"))))
                direct = memoryview(direct_source)[:-(-raw_bytes // 4096) * 4096]
                samples["raw_write_direct"].append(
                    time_once(lambda: write_raw_direct(direct, str(scratch / "raw.direct"))))
                direct.release()
                # A component of ours, for the notes: gathering the state dicts.
                samples["get_state_dict"].append(time_once(lambda: get_state_dict(model, optimizer)))
                samples["memcpy"].append(time_once(memcpy))

    try:
        with single_rank_process(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP's experimental/overwrite notices
            with process_group():
                dcp_save.stall()  # untimed warm-up: the stager allocates its buffers
            dcp_save.total_s.clear()
            for r in range(rounds):
                for step in ((ours, baselines) if r % 2 == 0 else (baselines, ours)):
                    step()
    finally:
        dcp_save.close()
    return Session(shape, ckpt_every, runs, samples, dcp_save.total_s, raw_bytes)


def _state_note(s: Session) -> str:
    late = s.late()
    return (f"{s.shape.state_bytes() / 1e6:.0f} MB fp32 model+AdamW state, checkpoint every {s.ckpt_every} steps"
            + (f"; {late} background save(s) still running at the next checkpoint step" if late else ""))


def _session_detail(s: Session) -> dict[str, Any]:
    steady, first, final = s.steady(), s.first(), s.final()
    return {"state_bytes": s.shape.state_bytes(), "shape": dataclasses.asdict(s.shape), "ckpt_every": s.ckpt_every,
            "training_threads": TRAINING_THREADS, "runs": len(s.runs), "late_saves": s.late(),
            "stall_steady_s": spread([t.stall_s for t in steady]), "stall_first_s": spread([t.stall_s for t in first]),
            "durable_steady_s": spread([t.durable_s for t in steady if t.durable_s is not None]),
            "final_synchronous_s": spread([t.stall_s for t in final]),
            "baseline_s": {name: spread(values) for name, values in s.samples.items()},
            "dcp_async_save_total_s": spread(s.dcp_total_s), "raw_bytes": s.raw_bytes,
            "peak_extra_rss_bytes": [run.peak_extra_rss(s.ckpt_every) for run in s.runs],
            "timings": [[dataclasses.asdict(t) for t in run.timings] for run in s.runs]}


def _steady_stall(s: Session) -> float:
    return median([t.stall_s for t in s.steady()])


@benchmark("stall_vs_torch_save")
def stall_vs_torch_save(ctx: Context) -> list[Record]:
    s = session(ctx)
    ours, base = _steady_stall(s), median(s.samples["torch_save"])
    return [Record.of(
        "stall_vs_torch_save", ours, base, "s", goal="ratio <= 0.10", met=ours / base <= 0.10,
        note=f"training-thread stall per async checkpoint, steady state (the first, which allocates the "
             f"staging buffers: {median([t.stall_s for t in s.first()]):.3f}s; gathering the state dicts, "
             f"part of the stall: {median(s.samples['get_state_dict']) * 1e3:.1f} ms on the baseline's model) "
             f"vs torch.save of the same state + fsync; " + _state_note(s),
        detail=_session_detail(s),
    )]


@benchmark("stall_vs_dcp_async_save")
def stall_vs_dcp_async_save(ctx: Context) -> list[Record]:
    s = session(ctx)
    ours, base = _steady_stall(s), median(s.samples["dcp_stall"])
    return [Record.of(
        "stall_vs_dcp_async_save", ours, base, "s", goal="ratio <= 0.8", met=ours / base <= 0.8,
        note=f"training-thread stall per async checkpoint vs dcp.async_save returning its future (a reused "
             f"DefaultStager; the whole save took {median(s.dcp_total_s):.2f}s); " + _state_note(s),
        detail=_session_detail(s),
    )]


@benchmark("commit_vs_raw_write")
def commit_vs_raw_write(ctx: Context) -> list[Record]:
    s = session(ctx)
    ours = median([t.durable_s for t in s.steady() if t.durable_s is not None])
    base = median(s.samples["raw_write"])
    final = median([t.stall_s for t in s.final()])
    return [Record.of(
        "commit_vs_raw_write", ours, base, "s", goal="ratio <= 1.25", met=ours / base <= 1.25,
        note=f"async checkpoint start -> checkpoint.committed appended, training going on (the final, "
             f"synchronous one, training stopped: {final:.2f}s = {final / base:.2f}x; stock dcp.async_save of "
             f"the same state, start to finish: {median(s.dcp_total_s):.2f}s, reading its files back and hashing them "
             f"{median(s.samples['dcp_hash']):.2f}s) vs one write+fsync of the same "
             f"{s.raw_bytes / 1e6:.0f} MB through the page cache (with O_DIRECT, as ours writes: "
             f"{median(s.samples['raw_write_direct']):.3f}s); " + _state_note(s),
        detail=_session_detail(s),
    )]


@benchmark("stall_vs_memcpy")
def stall_vs_memcpy(ctx: Context) -> list[Record]:
    s = session(ctx)
    ours, base = _steady_stall(s), median(s.samples["memcpy"])
    return [Record.of(
        "stall_vs_memcpy", ours, base, "s", goal="ratio <= 2.0", met=ours / base <= 2.0,
        note=f"training-thread stall per async checkpoint, steady state (gathering the state dicts, "
             f"{median(s.samples['get_state_dict']) * 1e3:.1f} ms of it on the baseline's model, the copy into "
             f"the reused staging buffers, the hand-off) vs copying the same tensors into buffers allocated once "
             f"({s.raw_bytes / max(base, 1e-9) / 1e9:.1f} GB/s); " + _state_note(s),
        detail=_session_detail(s),
    )]


@benchmark("commit_sync_vs_raw_write")
def commit_sync_vs_raw_write(ctx: Context) -> list[Record]:
    s = session(ctx)
    ours, base = median([t.stall_s for t in s.final()]), median(s.samples["raw_write"])
    return [Record.of(
        "commit_sync_vs_raw_write", ours, base, "s", goal="ratio <= 1.1", met=ours / base <= 1.1,
        note=f"the final, synchronous checkpoint (training stopped), call -> checkpoint.committed, vs one "
             f"write+fsync of the same {s.raw_bytes / 1e6:.0f} MB; " + _state_note(s),
        detail=_session_detail(s),
    )]


@benchmark("async_peak_extra_memory")
def async_peak_extra_memory(ctx: Context) -> list[Record]:
    s = session(ctx)
    extra = max(run.peak_extra_rss(s.ckpt_every) for run in s.runs)
    state = s.shape.state_bytes()
    return [Record.of(
        "async_peak_extra_memory", extra / 1e6, state / 1e6, "MB", goal="ratio <= 1.1", met=extra / state <= 1.1,
        note=f"peak resident set from the first checkpoint step to the end of a run over the peak of the "
             f"training steps before it (staging buffers allocated once, the writer, the final synchronous "
             f"save; sampled every 2 ms), worst of {len(s.runs)} runs, vs the state size; " + _state_note(s),
        detail=_session_detail(s),
    )]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.harness import run_module

    sys.exit(run_module(__file__))
