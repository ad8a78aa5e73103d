"""Re-projecting a 1,000,000-event log from scratch (``Ledger.full_replay()``: no snapshot, no cache).

The log is a long run as the trainer writes it: ``step.completed`` every step (with
loss, lr, grad norm), a two-rank checkpoint with an eval metric every 1,000 steps.
The baseline is the least any reader of the same rows must do: ``SELECT payload``
in seq order and ``json.loads`` each row — no validation, no upcasting, no fold.
The fixture is built once through the public API (``append_many`` in 50k batches) and
cached under ``bench/out/cache`` keyed by the code that defines the log format.
Run alone: ``python bench/replay.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from bench.harness import Context, Record, benchmark, interleaved, median, spread, time_once
from ledger import Ledger
from ledger.events import CheckpointCommitted, CheckpointStarted, MetricRecorded, ShardWritten, StepCompleted
from ledger.projection import encode_state, fold
from ledger.store import raw

N_EVENTS = 1_000_000
CKPT_EVERY = 1_000
BATCH = 50_000
_FORMAT_SOURCES = ("ledger/events/types.py", "ledger/events/codec.py", "ledger/store/format.py")


def _events(first_step: int, epoch: int):
    step = first_step
    while True:
        yield StepCompleted(step=step, metrics={"loss": 3.0 / step, "lr": 3e-4, "grad_norm": 0.5 + 1 / step})
        if step % CKPT_EVERY == 0:
            cid = f"step-{step:08d}"
            yield CheckpointStarted(checkpoint_id=cid, step=step, ranks=[0, 1], world_size=2, stack="fsdp",
                                    topology={"dp": 2, "tp": 1, "pp": 1})
            for rank in (0, 1):
                yield ShardWritten(checkpoint_id=cid, rank=rank, location=f"blobs/{cid}/e{epoch}/rank{rank}.distcp",
                                   bytes=64 << 20, hash="blake2b:" + hashlib.blake2b(cid.encode(), digest_size=32).hexdigest(),
                                   codec="zstd-bg")
            yield CheckpointCommitted(checkpoint_id=cid, step=step)
            yield MetricRecorded(name="eval_loss", value=2.0 / step, step=step, checkpoint_id=cid)
        step += 1


def build_log(run_dir: Path, n_events: int) -> None:
    """A run of ``n_events`` events through the public API, in big batches."""
    led = Ledger.open(run_dir)
    led.start_run(run_id="replay-bench", config={"best_metric": "eval_loss"})
    epoch = led.begin_attempt(world_size=2, stack="fsdp").epoch
    source, written = _events(1, epoch), 2
    while written < n_events:
        batch = [next(source) for _ in range(min(BATCH, n_events - written))]
        led.append_many(batch, epoch=epoch)
        written += len(batch)
    led.close()


def cached_log(ctx: Context, n_events: int) -> Path:
    """The fixture for ``n_events``, built on first use (the key changes when the log format's code does)."""
    root = Path(__file__).resolve().parents[1]
    key = hashlib.sha256(b"".join((root / p).read_bytes() for p in _FORMAT_SOURCES)).hexdigest()[:12]
    run_dir = ctx.cache_dir / f"replay-{n_events}-{key}"
    if not (run_dir / "ledger.db").exists():
        for stale in ctx.cache_dir.glob(f"replay-{n_events}-*"):
            shutil.rmtree(stale)
        building = run_dir.with_name(run_dir.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        started = time.perf_counter()
        build_log(building, n_events)
        building.rename(run_dir)
        ctx.log(f"built the {n_events:,}-event log in {time.perf_counter() - started:.0f}s")
    return run_dir


def plain_json_rows(db: Path) -> int:
    """The baseline: every payload in seq order through ``json.loads``."""
    conn = raw.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        n = 0
        cursor = conn.execute("SELECT payload FROM events ORDER BY seq")
        while rows := cursor.fetchmany(8192):
            for (payload,) in rows:
                json.loads(payload)
            n += len(rows)
        return n
    finally:
        conn.close()


def _check_fast_path_matches(run_dir: Path) -> None:
    """The fast path must fold exactly what the per-event reference fold does (checked on a prefix)."""
    led = Ledger.open(run_dir, read_only=True)
    at = 120_000
    reference = fold(led.iter_events(until=at))
    if encode_state(reference) != encode_state(led.full_replay(at=at)):
        raise RuntimeError("full_replay() differs from the per-event fold")


@benchmark("replay_1m_events")
def replay(ctx: Context) -> list[Record]:
    run_dir = cached_log(ctx, N_EVENTS)
    _check_fast_path_matches(run_dir)
    led = Ledger.open(run_dir, read_only=True)
    states = []
    ours_t, base_t = interleaved(lambda: states.append(led.full_replay().seq),
                                 lambda: plain_json_rows(run_dir / "ledger.db"), ctx.reps(3, 5))
    if set(states) != {N_EVENTS}:
        raise RuntimeError(f"replay folded {states} events, expected {N_EVENTS}")
    ours, base = median(ours_t), median(base_t)
    return [Record.of(
        "replay_1m_events", ours, base, "s", goal="ours <= 1.0 s", met=ours <= 1.0,
        note=f"full_replay() of {N_EVENTS:,} events ({N_EVENTS / ours:,.0f} events/s) vs SELECT payload + json.loads",
        detail={"events": N_EVENTS, "ours_s": spread(ours_t), "baseline_s": spread(base_t)},
    ), catch_up(ctx, led)]


def catch_up(ctx: Context, led: Ledger) -> Record:
    """A reader following a live log (``tail -f``, a dashboard) reads only what is new: O(N) in the new events.

    Times reading the newest 10,000 events vs the newest 1,000 of the 1M log (10x = linear),
    and the newest 1,000 vs the first 1,000 (1x = independent of how long the log already is).
    """
    newest = led.max_seq()

    def read(after: int, n: int) -> int:
        return sum(1 for _ in led.iter_events(after=after, until=after + n))

    reps = ctx.reps(5, 9)
    small_t, big_t = interleaved(lambda: read(newest - 1_000, 1_000), lambda: read(newest - 10_000, 10_000), reps)
    first_t = [time_once(lambda: read(0, 1_000)) for _ in range(reps)]
    small, big, first = median(small_t), median(big_t), median(first_t)
    ratio = big / small
    return Record.of(
        "replay_catch_up_10k_vs_1k", ratio, 10.0, "x", goal="ours <= 12x (linear in new events)", met=ratio <= 12.0,
        note=f"iter_events over the newest 10k vs 1k events of {newest:,} ({small * 1e3:.1f} ms for 1k at the end, "
             f"{first * 1e3:.1f} ms for the first 1k): cost follows the new events, not the log",
        detail={"newest_1k_s": spread(small_t), "newest_10k_s": spread(big_t), "first_1k_s": spread(first_t)})


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.harness import run_module

    sys.exit(run_module(__file__))
