"""Baselines and probes shared by the checkpoint benchmarks: the physical floors ours is compared with."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch


class RssSampler:
    """Samples this process's resident set size every ``interval_s`` on a thread (a context manager)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        with open("/proc/self/statm", "rb") as statm:
            while not self._stop.is_set():
                statm.seek(0)
                self.samples.append((time.perf_counter(), int(statm.read().split()[1]) * self._page))
                self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        if os.path.exists("/proc/self/statm"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class PreallocatedCopy:
    """The physical floor of a snapshot: copying the same tensors into buffers allocated once."""

    def __init__(self, state: Any) -> None:  # noqa: ANN401 - nested dicts/lists of tensors
        self.sources = list(_tensors(state))
        self.buffers = [torch.empty_like(t) for t in self.sources]

    def __call__(self) -> None:
        for buffer, source in zip(self.buffers, self.sources):
            buffer.copy_(source)


def _tensors(value: Any) -> Iterator[torch.Tensor]:  # noqa: ANN401
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def write_raw_direct(staged: memoryview, path: str) -> None:
    """Context for the raw floor: the same bytes written with ``O_DIRECT`` (from an aligned buffer), then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
    try:
        chunk = 8 << 20
        for offset in range(0, len(staged), chunk):
            piece = staged[offset:offset + chunk]
            while len(piece):
                piece = piece[os.write(fd, piece):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_raw(paths: list[Path], buffer: memoryview) -> int:
    """The floor of reading files back: ``readinto`` one preallocated buffer, file after file."""
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while count := file.readinto(buffer[total:]):
                total += count
    return total
