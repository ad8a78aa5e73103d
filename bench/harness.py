"""The shared benchmark harness: a registry, interleaved timing, and one record format.

A benchmark is a function ``fn(ctx) -> list[Record]`` registered with
:func:`benchmark`; any module ``bench/<name>.py`` is discovered by ``bench/run.py``,
so a new benchmark is a new file (or a new decorated function), nothing else.

Every record compares *ours* with a *baseline measured in the same run* — never a
number from another day or machine — so ``ratio = ours / baseline`` stays meaningful
on a noisy shared box. ``better`` says which direction wins (``lower`` for times and
sizes, ``higher`` for throughputs). Timings are medians of interleaved repetitions
(ours, baseline, baseline, ours, ...), so load drifts hit both sides alike.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
#: Modules of bench/ that hold no benchmarks.
NOT_BENCHMARKS = {"harness", "run", "__init__", "__main__"}


@dataclass(frozen=True)
class Record:
    """One result: ours vs a baseline measured in the same run."""

    name: str
    ours: float
    baseline: float
    ratio: float
    unit: str
    better: str = "lower"  # lower | higher: which direction of ``ours`` (and ``ratio``) wins
    goal: str = ""  # the target, in words, e.g. "ratio <= 0.01"
    met: bool | None = None  # whether ``goal`` was met (None: no goal)
    note: str = ""  # what was measured, briefly
    detail: dict[str, Any] = field(default_factory=dict)  # samples, sizes, parameters

    @classmethod
    def of(cls, name: str, ours: float, baseline: float, unit: str, **kw: Any) -> "Record":
        """A record with ``ratio = ours / baseline``."""
        return cls(name=name, ours=ours, baseline=baseline, ratio=ours / baseline if baseline else float("inf"),
                   unit=unit, **kw)


@dataclass
class Context:
    """What a benchmark gets: the mode, a scratch directory and a logger."""

    quick: bool
    workdir: Path
    cache_dir: Path
    verbose: bool = True

    def reps(self, quick: int, full: int) -> int:
        """Repetitions for the current mode."""
        return quick if self.quick else full

    def log(self, message: str) -> None:
        """Progress on stderr (the table goes to stdout)."""
        if self.verbose:
            print(f"  .. {message}", file=sys.stderr, flush=True)

    def scratch(self, name: str) -> Path:
        """A fresh directory under the run's scratch space."""
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        return path


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark."""

    name: str
    fn: Callable[[Context], list[Record]]
    module: str
    quick: bool  # included in --quick runs


REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, *, quick: bool = True) -> Callable[[Callable[[Context], list[Record]]], Callable[[Context], list[Record]]]:
    """Register ``fn(ctx) -> list[Record]`` under ``name`` (``quick=False``: skipped by ``--quick``)."""

    def register(fn: Callable[[Context], list[Record]]) -> Callable[[Context], list[Record]]:
        if fn.__module__ == "__main__":
            return fn  # a module run as a script registers through its importable name (see run_module)
        if name in REGISTRY and REGISTRY[name].fn is not fn:
            raise ValueError(f"benchmark {name!r} registered twice ({REGISTRY[name].module} and {fn.__module__})")
        REGISTRY[name] = Benchmark(name=name, fn=fn, module=fn.__module__, quick=quick)
        return fn

    return register


# -- timing ---------------------------------------------------------------------------------


def median(samples: list[float]) -> float:
    """The median (robust to the odd preempted repetition)."""
    return statistics.median(samples)


def time_once(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(ours: Callable[[], Any], baseline: Callable[[], Any], reps: int,
                setup: Callable[[], Any] | None = None) -> tuple[list[float], list[float]]:
    """Time ``ours`` and ``baseline`` ``reps`` times each, alternating which goes first.

    ``setup`` (untimed) runs before every timed call. Returns both sample lists.
    """
    ours_t: list[float] = []
    base_t: list[float] = []
    for i in range(reps):
        order = ((ours, ours_t), (baseline, base_t)) if i % 2 == 0 else ((baseline, base_t), (ours, ours_t))
        for fn, sink in order:
            if setup is not None:
                setup()
            sink.append(time_once(fn))
    return ours_t, base_t


def in_blocks(ours: Callable[[], Any], baseline: Callable[[], Any], reps: int) -> tuple[list[float], list[float]]:
    """Time ``ours`` and ``baseline`` ``reps`` times each in blocks ordered ours, baseline, ours.

    For a baseline that churns the process's caches (a scan of 10,000 directories
    evicts what a following millisecond-scale call had warm, which a real restarting
    job would not have just done): the A-B-A blocks still spread slow drift in machine
    load over both sides, without one side paying for the other's footprint.
    """
    first = [time_once(ours) for _ in range(reps - reps // 2)]
    base_t = [time_once(baseline) for _ in range(reps)]
    return first + [time_once(ours) for _ in range(reps // 2)], base_t


def spread(samples: list[float]) -> dict[str, Any]:
    """Samples and their min/median/max, for a record's ``detail``."""
    return {"samples": [round(s, 9) for s in samples], "min": min(samples), "median": median(samples),
            "max": max(samples)}


# -- running --------------------------------------------------------------------------------


def discover() -> list[str]:
    """Import every benchmark module in bench/; returns the ones that failed to import (with why)."""
    failed = []
    for info in pkgutil.iter_modules([str(BENCH_DIR)]):
        if info.name in NOT_BENCHMARKS or info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"bench.{info.name}")
        except ImportError as exc:  # e.g. a trainer-dependent benchmark before the trainer lands
            failed.append(f"bench/{info.name}.py: {exc}")
    return failed


def _fmt(value: float) -> str:
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:.3g}" if magnitude < 100 else f"{value:.0f}"
    return f"{value:.3g}"


def table(records: list[Record]) -> str:
    """A plain-text (also valid Markdown) table of records."""
    rows = [("benchmark", "ours", "baseline", "unit", "ratio", "better", "goal", "met")]
    for r in records:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        rows.append((r.name, _fmt(r.ours), _fmt(r.baseline), r.unit, _fmt(r.ratio), r.better, r.goal, met))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run(names: list[str], ctx: Context) -> tuple[list[Record], list[str]]:
    """Run the named benchmarks in order; a failing one is reported and the rest still run."""
    records: list[Record] = []
    errors: list[str] = []
    for name in names:
        bench = REGISTRY[name]
        print(f"[{name}] ({bench.module})", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            produced = bench.fn(ctx)
        except Exception:  # a benchmark is a worker: report it, keep the others running
            errors.append(f"{name}: {traceback.format_exc(limit=4)}")
            print(errors[-1], file=sys.stderr)
            continue
        for record in produced:
            print(f"  {record.name}: ours {_fmt(record.ours)} vs {_fmt(record.baseline)} {record.unit} "
                  f"-> ratio {_fmt(record.ratio)} ({record.better} is better) {record.note}", file=sys.stderr)
        print(f"  done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        records.extend(produced)
    return records, errors


def machine() -> dict[str, Any]:
    """Where the numbers came from."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "loadavg_at_start": load}


def main(argv: list[str] | None = None, *, modules: list[str] | None = None, default_out: str = "results.json") -> int:
    """CLI shared by ``bench/run.py`` (all modules) and each module run on its own."""
    parser = argparse.ArgumentParser(description="Run ckpt-ledger benchmarks; prints a table, writes JSON records.")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (<= 5 min on 2 cores)")
    parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                        help="run only benchmarks whose name contains this (repeatable)")
    parser.add_argument("--out", type=Path, default=OUT_DIR / default_out, help="where to write the JSON records")
    parser.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    args = parser.parse_args(argv)

    failed_imports = discover() if modules is None else []
    names = [n for n, b in REGISTRY.items() if modules is None or b.module in modules]
    if args.quick:
        names = [n for n in names if REGISTRY[n].quick]
    if args.only:
        names = [n for n in names if any(s in n for s in args.only)]
    if args.list:
        for n in names:
            print(f"{n}\t{REGISTRY[n].module}\t{'quick' if REGISTRY[n].quick else 'full only'}")
        return 0
    for failure in failed_imports:
        print(f"skipped {failure}", file=sys.stderr)

    cache_dir = OUT_DIR / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-", dir=OUT_DIR) as tmp:
        ctx = Context(quick=args.quick, workdir=Path(tmp), cache_dir=cache_dir)
        records, errors = run(names, ctx)
    elapsed = time.perf_counter() - started

    print(table(records))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([asdict(r) for r in records], indent=2) + "\n")
    meta = {**machine(), "quick": args.quick, "elapsed_s": round(elapsed, 1), "benchmarks": names,
            "errors": errors, "skipped_modules": failed_imports}
    args.out.with_name(args.out.stem + ".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"\n{len(records)} records from {len(names)} benchmarks in {elapsed:.0f}s -> {args.out}", file=sys.stderr)
    return 1 if errors else 0


def run_module(path: str) -> int:
    """``python bench/<name>.py [--quick] ...``: run only that module's benchmarks."""
    root = str(Path(path).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    module = f"bench.{Path(path).stem}"
    importlib.import_module(module)
    return main(modules=[module], default_out=f"{Path(path).stem}.json")


def chunks(n: int, size: int) -> Iterator[range]:
    """``range(n)`` in consecutive pieces of at most ``size``."""
    for start in range(0, n, size):
        yield range(start, min(n, start + size))
