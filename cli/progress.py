"""Progress bars for long commands (``audit --verify-blobs``, ``export``): tqdm on stderr, only on a terminal."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

#: ``update(done_bytes, total_bytes)``.
ByteProgress = Callable[[int, int], None]


def wanted(as_json: bool = False) -> bool:
    """A bar is drawn only for a person watching: stderr is a terminal and the output is not JSON."""
    return not as_json and sys.stderr.isatty()


@contextmanager
def byte_progress(label: str, enabled: bool) -> Iterator[ByteProgress | None]:
    """A callback drawing a bytes bar labelled ``label`` while the block runs (``None`` when disabled)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm  # only drawn on a terminal: no import cost for scripted use

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=max(total, 1), desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                       file=sys.stderr, leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()
