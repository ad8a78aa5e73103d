"""Progress bars for long operations: tqdm on stderr, drawn only for a person watching a terminal.

``audit --verify-blobs`` and ``export`` (cli/) draw one while they hash; ``train`` draws one
while rank 0's checkpoint file goes to the blob store (trainer/). It lives in ledger/ so the
trainer needs nothing of cli/. Nothing is drawn when stderr is not a terminal or the output
is JSON, so scripted use sees no bar and pays no tqdm import.
"""

from __future__ import annotations

import io
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

#: ``update(done_bytes, total_bytes)``; a total of ``None``: not known in advance (bytes and rate only).
ByteProgress = Callable[[int, int | None], None]


def wanted(as_json: bool = False) -> bool:
    """A bar is drawn only for a person watching: stderr is a terminal and the output is not JSON."""
    return not as_json and sys.stderr.isatty()


@contextmanager
def byte_progress(label: str, enabled: bool) -> Iterator[ByteProgress | None]:
    """A callback drawing a bytes bar labelled ``label`` while the block runs (``None`` when disabled).

    The bar appears at the first update, from whichever thread makes it. While it is drawn,
    lines printed to stdout on the same terminal (a training loop's step lines) are written
    whole, above it, instead of being glued onto the bar's line.
    """
    if not enabled:
        yield None
        return
    from tqdm import tqdm  # only drawn on a terminal: no import cost for scripted use

    bar = None
    lines: _LinesAboveBar | None = None

    def update(done: int, total: int | None) -> None:
        nonlocal bar, lines
        if bar is None:
            bar = tqdm(total=None if total is None else max(total, 1), desc=label, unit="B", unit_scale=True,
                       unit_divisor=1024, file=sys.stderr, leave=False, dynamic_ncols=True)
            if sys.stdout.isatty() and not isinstance(sys.stdout, _LinesAboveBar):
                lines = _LinesAboveBar(sys.stdout, tqdm, bar_file=sys.stderr)
                sys.stdout = lines
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if lines is not None:
            lines.release()
        if bar is not None:
            bar.close()


class _LinesAboveBar(io.TextIOBase):
    """``sys.stdout`` while a bar is drawn on the same terminal: each whole line is written with the bar
    cleared first and redrawn after (tqdm's ``external_write_mode``); a partial line waits for its end."""

    def __init__(self, real: Any, tqdm_class: Any, *, bar_file: Any) -> None:  # noqa: ANN401 - streams, tqdm
        super().__init__()
        self._real = real
        self._tqdm = tqdm_class
        self._bar_file = bar_file  # tqdm clears the bars drawn on this file
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        if "\n" in self._partial:
            whole, _, self._partial = self._partial.rpartition("\n")
            with self._tqdm.external_write_mode(file=self._bar_file):
                self._real.write(whole + "\n")
                self._real.flush()
        return len(text)

    def flush(self) -> None:
        self._real.flush()

    def isatty(self) -> bool:
        return self._real.isatty()

    def fileno(self) -> int:
        return self._real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._real.encoding

    def release(self) -> None:
        """Put the real stdout back (if nobody replaced this one since) and write what is left."""
        if sys.stdout is self:
            sys.stdout = self._real
        if self._partial:
            self._real.write(self._partial)
            self._partial = ""
        self._real.flush()
