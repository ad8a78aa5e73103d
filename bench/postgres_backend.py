"""The ledger on PostgreSQL vs on SQLite, measured in the same run (issue 17).

* ``postgres_append_batched`` — ``append_many`` of 1,000 ``step.completed`` per transaction.
* ``postgres_append_single`` — one fenced ``append`` (its own durable transaction).
* ``postgres_fenced_commit`` — ``commit_checkpoint`` (rank check + fence + insert in one transaction).
* ``resume_lookup_postgres_vs_sqlite`` — a cold read-only open plus ``projection().resume``.
* ``runs_list_1000`` — listing 1,000 runs of one database (``ckpt-ledger runs URL``) vs a
  cold ``inspect``-style projection of *one* local run; goal: at most 100 ms.

*Ours* is PostgreSQL, the *baseline* SQLite (``RUN_DIR/ledger.db``), both durable
(PostgreSQL: ``fsync=on``, ``synchronous_commit=on``; SQLite: WAL, ``synchronous=FULL``),
both on this machine's disk, the server on loopback TCP. The server is a throwaway
cluster started by the tests' helper (``tests/pg_server.py``), so the figures include a
real network round trip per statement but no network latency beyond loopback.
Run alone: ``python bench/postgres_backend.py``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Iterator

from bench.harness import Context, Record, benchmark, interleaved, median, spread, time_once
from ledger import Ledger
from ledger.events import ShardWritten, StepCompleted

BATCH = 1000
RUNS = 1000
LIST_GOAL_MS = 100.0


@contextlib.contextmanager
def _server() -> Iterator[object]:
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from pg_server import PostgresServer

    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def _steps(first: int, n: int) -> list[StepCompleted]:
    return [StepCompleted(step=s, metrics={"loss": 2.0 / (s + 1), "lr": 3e-4, "grad_norm": 0.7})
            for s in range(first, first + n)]


def _writer(address: str | Path, prefill: int, blobs: Path) -> tuple[Ledger, int]:
    led = Ledger.open(address)
    led.start_run(run_id="bench", config={}, blobs=str(blobs))  # no shard is written: ids are only checked
    epoch = led.begin_attempt(world_size=1, stack="ddp").epoch
    for first in range(0, prefill, 20_000):  # a log that already holds a run's worth of events
        led.append_many(_steps(first, min(20_000, prefill - first)), epoch=epoch)
    return led, epoch


def _checkpoint(led: Ledger, epoch: int, i: int) -> str:
    cid = f"ckpt-{i:09d}"
    led.begin_checkpoint(checkpoint_id=cid, step=i, ranks=[0, 1], world_size=2, stack="ddp", epoch=epoch)
    led.record_shards(cid, [ShardWritten(checkpoint_id=cid, rank=r, location=f"blobs/{cid}/e{epoch}/rank{r}.bin",
                                         bytes=1 << 20, hash="xxh3:" + "0" * 16, codec="none") for r in (0, 1)],
                      epoch=epoch)
    return cid


def _both(ctx: Context, server, name: str, prefill: int) -> tuple[tuple[Ledger, int], tuple[Ledger, int]]:
    url = server.create_database(name.replace("-", "_")) + "?run=bench"
    return _writer(url, prefill, ctx.scratch(f"{name}-pg-blobs")), _writer(ctx.scratch(name), prefill,
                                                                      ctx.scratch(f"{name}-blobs"))


def append_rows(ctx: Context, server) -> list[Record]:
    records = []
    reps, prefill = ctx.reps(10, 30), ctx.reps(10_000, 100_000)
    (pg, pg_epoch), (lite, lite_epoch) = _both(ctx, server, "batched", prefill)
    pg_batches = iter([_steps(prefill + i * BATCH, BATCH) for i in range(reps)])
    lite_batches = iter([_steps(prefill + i * BATCH, BATCH) for i in range(reps)])
    ours_t, base_t = interleaved(lambda: pg.append_many(next(pg_batches), epoch=pg_epoch),
                                 lambda: lite.append_many(next(lite_batches), epoch=lite_epoch), reps)
    ours, base = median(ours_t) / BATCH * 1e6, median(base_t) / BATCH * 1e6
    records.append(Record.of(
        "postgres_append_batched", ours, base, "us/event",
        note=f"append_many of {BATCH} step.completed: PostgreSQL {1e6 / ours:,.0f} events/s vs SQLite "
             f"{1e6 / base:,.0f} events/s (logs prefilled with {prefill:,} events)",
        detail={"batch": BATCH, "prefill": prefill, "ours_s_per_batch": spread(ours_t),
                "baseline_s_per_batch": spread(base_t)}))

    reps = ctx.reps(30, 100)
    singles_pg, singles_lite = iter(_steps(10**9, reps)), iter(_steps(10**9, reps))
    ours_t, base_t = interleaved(lambda: pg.append(next(singles_pg), epoch=pg_epoch),
                                 lambda: lite.append(next(singles_lite), epoch=lite_epoch), reps)
    records.append(Record.of(
        "postgres_append_single", median(ours_t) * 1e3, median(base_t) * 1e3, "ms",
        note="one fenced append in its own durable transaction: PostgreSQL (row lock, WAL flush) vs SQLite",
        detail={"ours_s": spread(ours_t), "baseline_s": spread(base_t)}))

    ours_t, base_t = [], []
    for i in range(ctx.reps(20, 60)):
        pg_cid, lite_cid = _checkpoint(pg, pg_epoch, i), _checkpoint(lite, lite_epoch, i)
        timed = [(lambda: pg.commit_checkpoint(pg_cid, epoch=pg_epoch), ours_t),
                 (lambda: lite.commit_checkpoint(lite_cid, epoch=lite_epoch), base_t)]
        for fn, sink in (timed if i % 2 == 0 else timed[::-1]):
            sink.append(time_once(fn))
    records.append(Record.of(
        "postgres_fenced_commit", median(ours_t) * 1e3, median(base_t) * 1e3, "ms",
        note="commit_checkpoint: rank check + fence + insert in one transaction, PostgreSQL vs SQLite",
        detail={"ours_s": spread(ours_t), "baseline_s": spread(base_t)}))
    pg_url, lite_dir = pg.store.location, lite.run_dir
    pg.close()
    lite.close()

    def resume(address) -> None:
        with Ledger.open(address, read_only=True) as ro:
            ro.projection().resume

    ours_t, base_t = interleaved(lambda: resume(pg_url), lambda: resume(lite_dir), ctx.reps(10, 30))
    records.append(Record.of(
        "resume_lookup_postgres_vs_sqlite", median(ours_t) * 1e3, median(base_t) * 1e3, "ms",
        note=f"cold read-only open + projection().resume of a run of ~{prefill:,} events: PostgreSQL vs SQLite",
        detail={"ours_s": spread(ours_t), "baseline_s": spread(base_t)}))
    return records


def runs_list_row(ctx: Context, server) -> list[Record]:
    from ledger.run_list import list_runs

    url = server.create_database("many_runs")
    blobs = ctx.scratch("many-runs-blobs")
    start = time.perf_counter()
    for n in range(RUNS):
        with Ledger.open(f"{url}?run=run-{n:04d}") as led:
            led.start_run(run_id=f"run-{n:04d}", config={"n": n}, blobs=str(blobs / f"run-{n:04d}"))
            epoch = led.begin_attempt(world_size=1, stack="ddp").epoch
            led.append_many(_steps(1, 20), epoch=epoch)
            led.commit_checkpoint(_checkpoint(led, epoch, 20), epoch=epoch)
    ctx.log(f"built {RUNS} runs in {time.perf_counter() - start:.1f}s")
    local = ctx.scratch("one-run")
    with Ledger.open(local) as led:
        led.start_run(run_id="one", config={})
        epoch = led.begin_attempt(world_size=1, stack="ddp").epoch
        led.append_many(_steps(1, 20), epoch=epoch)
        led.commit_checkpoint(_checkpoint(led, epoch, 20), epoch=epoch)

    def inspect_local() -> None:
        with Ledger.open(local, read_only=True) as ro:
            ro.projection().to_dict()

    listed = list_runs(url)
    assert len(listed) == RUNS and all(r.resume is not None for r in listed), "the listing is wrong"
    ours_t, base_t = interleaved(lambda: list_runs(url), inspect_local, ctx.reps(7, 15))
    ours = median(ours_t) * 1e3
    return [Record.of(
        "runs_list_1000", ours, median(base_t) * 1e3, "ms", goal=f"ours <= {LIST_GOAL_MS:.0f} ms",
        met=ours <= LIST_GOAL_MS,
        note=f"list_runs over {RUNS} runs (connect + one query of the read model) vs a cold projection of one "
             "local run",
        detail={"runs": RUNS, "ours_s": spread(ours_t), "baseline_s": spread(base_t)})]


@benchmark("postgres_backend")
def postgres_backend(ctx: Context) -> list[Record]:
    with _server() as server:
        return append_rows(ctx, server) + runs_list_row(ctx, server)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.harness import run_module

    sys.exit(run_module(__file__))
