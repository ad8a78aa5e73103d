"""Training time lost to checkpoints: ``step_overhead``, ``step_overhead_sync``, ``lost_training_async_vs_sync``.

Three variants of the same trainer run, rotated: a checkpoint every ``N`` steps
asynchronously, the same synchronously, and none but the final one (see
``docs/performance.md`` for the method: steps away from any checkpoint count at their
run's median, so other jobs' load cancels out).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

from bench.harness import Context, Record, benchmark, median, spread
from bench.trainer_checkpoint import TRAINING_THREADS, RunResult, Shape, single_rank_process, train


def _mean_step(run: RunResult, first: int, last: int) -> float:
    """Mean wall time of steps ``first..last`` (1-based, inclusive) of one run."""
    window = run.steps[first - 1:last]
    return sum(window) / len(window)


def checkpoint_steps(runs: list[RunResult]) -> set[int]:
    """Steps during which an asynchronous checkpoint of any of ``runs`` was stalling or being written.

    From the checkpoint's step to the step in which its ``durable_s`` ran out (inclusive).
    """
    touched: set[int] = set()
    for run in runs:
        for t in run.timings:
            if t.synchronous or t.durable_s is None:
                continue
            ends = run.marks[t.step - 1] + run.steps[t.step - 1] + t.durable_s
            step = t.step
            while step < len(run.marks) and run.marks[step - 1] <= ends:
                touched.add(step)
                step += 1
    return touched


def relative_mean_step(run: RunResult, first: int, last: int, touched: set[int]) -> tuple[float, float]:
    """``(relative mean, reference)`` of steps ``first..last``: the reference is the median of the
    steps outside ``touched``; the relative mean is the mean of the steps with those outside
    ``touched`` counted at the reference and those inside as measured, over the reference.

    Other jobs on a shared box move whole runs' step times by tens of percent and add bursts of
    slow steps anywhere; the reference cancels the first, and keeping measured times only where a
    checkpoint can act (the same steps in every variant) keeps the second out of the comparison.
    """
    window = range(first, last + 1)
    reference = median([run.steps[s - 1] for s in window if s not in touched])
    excess = sum(run.steps[s - 1] - reference for s in window if s in touched)
    return 1.0 + excess / (len(window) * reference), reference


@benchmark("step_overhead")
def step_overhead(ctx: Context) -> list[Record]:
    # A small state (12.7 MB) so that a checkpoint's background save (~0.2 s here) is a small part
    # of the interval (~1/6 in quick runs, ~1/25 in full ones) and a run stays short.
    shape = Shape(width=512, layers=4)
    ckpt_every, ckpts, rounds = ctx.reps(50, 250), ctx.reps(1, 2), 3  # 3 runs: a median, even quick
    steps = ckpt_every * (ckpts + 1)
    # Steps 2 .. steps-1: every periodic checkpoint (stall and background work), not the first step
    # (warm-up) nor the last (it holds the final, synchronous checkpoint, which every variant takes).
    first, last = 2, steps - 1
    scratch = ctx.scratch("step-overhead")
    variants: dict[str, Callable[[Path], RunResult]] = {
        "async": lambda d: train(d, shape, steps=steps, ckpt_every=ckpt_every, async_checkpoint=True),
        "none": lambda d: train(d, shape, steps=steps, ckpt_every=steps, async_checkpoint=True),
        "sync": lambda d: train(d, shape, steps=steps, ckpt_every=ckpt_every, async_checkpoint=False),
    }
    runs: dict[str, list[RunResult]] = {v: [] for v in variants}
    names = list(variants)
    with single_rank_process():
        for r in range(rounds):
            for name in names[r % 3:] + names[: r % 3]:  # rotate who goes first
                runs[name].append(variants[name](scratch / f"{name}{r}"))
                ctx.log(f"{name}: mean step {_mean_step(runs[name][-1], first, last) * 1e3:.2f} ms")

    # The same steps are set aside in every variant: those any async run spent checkpointing, and
    # the checkpoint steps themselves (a synchronous save stalls only its own step).
    touched = checkpoint_steps(runs["async"]) | set(range(ckpt_every, steps, ckpt_every))
    relative = {v: [relative_mean_step(run, first, last, touched) for run in runs[v]] for v in variants}
    reference = median([ref for v in variants for _, ref in relative[v]])
    # Step times in ms at the common reference.
    mean = {v: median([rel for rel, _ in relative[v]]) * reference for v in variants}
    slowdown = {v: (mean[v] / mean["none"] - 1) * 100 for v in ("async", "sync")}
    # What one checkpoint costs the run: the extra time over the measured steps, per checkpoint in them.
    lost = {v: (mean[v] - mean["none"]) * (last - first + 1) / ckpts for v in ("async", "sync")}
    background = [t.durable_s for run in runs["async"] for t in run.timings if not t.synchronous]
    interval = reference * ckpt_every
    raw = {v: median([_mean_step(run, first, last) for run in runs[v]]) for v in variants}
    detail = {"shape": dataclasses.asdict(shape), "state_bytes": shape.state_bytes(), "ckpt_every": ckpt_every,
              "steps": steps, "measured_steps": [first, last], "rounds": rounds, "training_threads": TRAINING_THREADS,
              "steps_set_aside_for_reference": sorted(touched), "reference_step_s": reference,
              "relative_mean_step": {v: spread([rel for rel, _ in relative[v]]) for v in variants},
              "run_reference_step_s": {v: spread([ref for _, ref in relative[v]]) for v in variants},
              "raw_mean_step_s": {v: spread([_mean_step(run, first, last) for run in runs[v]]) for v in variants},
              "raw_slowdown_pct": {v: (raw[v] / raw["none"] - 1) * 100 for v in ("async", "sync")},
              "checkpoint_interval_s": interval, "async_durable_s": spread(background), "lost_per_checkpoint_s": lost,
              "interval_for_3.5pct_s": {v: lost[v] / 0.035 for v in lost},
              "timings": {v: [[dataclasses.asdict(t) for t in run.timings] for run in runs[v]] for v in variants}}
    what = (f"{shape.state_bytes() / 1e6:.1f} MB state, checkpoint every {ckpt_every} steps (~{interval:.1f}s of "
            f"training; a background save took {median(background):.2f}s), steps {first}-{last} of {steps}, "
            f"{rounds} runs each, steps away from any checkpoint counted at their run's median, in ms at "
            f"the common median (raw means: async {detail['raw_slowdown_pct']['async']:+.1f}%, "
            f"sync {detail['raw_slowdown_pct']['sync']:+.1f}%)")

    def cost(v: str) -> str:
        return f"{slowdown[v]:+.1f}%, {lost[v]:.3f}s of training per checkpoint"

    return [
        Record.of("step_overhead", mean["async"] * 1e3, mean["none"] * 1e3, "ms/step", goal="slowdown <= 3.5%",
                  met=slowdown["async"] <= 3.5,
                  note=f"mean step time with async checkpoints vs none: {cost('async')}; {what}", detail=detail),
        Record.of("step_overhead_sync", mean["sync"] * 1e3, mean["none"] * 1e3, "ms/step",
                  note=f"mean step time with synchronous checkpoints vs none: {cost('sync')}; {what}", detail=detail),
        Record.of("lost_training_async_vs_sync", lost["async"], lost["sync"], "s/checkpoint", goal="ratio <= 0.5",
                  met=lost["sync"] > 0 and lost["async"] / lost["sync"] <= 0.5,
                  note=f"training time lost per checkpoint, async vs sync, from the same runs as step_overhead; "
                       f"{what}", detail=detail),
    ]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.harness import run_module

    sys.exit(run_module(__file__))
