"""Appending to a new file with ``O_DIRECT``: bytes go to the disk without filling the page cache.

Why: a checkpoint writes hundreds of MB into *new* files. Through the page cache, every
page of a new file must first be allocated — measured on the 2-core VM this project is
benchmarked on, 57 MB into a fresh file took a median 0.27 s (and grew as files
accumulated) against 0.07 s to overwrite an existing file and 0.05 s with ``O_DIRECT``.
Direct I/O needs the memory address, the file offset and the length of every write
aligned to the device's block size; :class:`DirectAppender` copies the caller's
buffers into one page-aligned bounce buffer (numpy copies, GIL released) and writes it
whole, pads the last block with zeros and truncates the file back to its true size.

Where the file system refuses ``O_DIRECT`` (tmpfs, some network file systems) the
caller falls back to ordinary writes: :func:`open_direct` returns ``None``, or the first
write raises ``EINVAL`` before anything reached the file.
"""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np

#: Alignment of addresses, offsets and lengths (a multiple of every common logical block size).
ALIGN = 4096
#: Bytes gathered before each write: large sequential writes, a small fixed amount of memory.
BOUNCE_BYTES = 8 << 20


def open_direct(path: os.PathLike[str] | str) -> int | None:
    """A second, ``O_DIRECT`` write descriptor on an existing file, or ``None`` if the system refuses one."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def refused_direct(err: OSError) -> bool:
    """Whether a failed direct write means "this file system does not do ``O_DIRECT``"."""
    return err.errno in (errno.EINVAL, errno.EOPNOTSUPP)


class DirectAppender:
    """Appends to the file behind ``fd`` (opened with ``O_DIRECT``, empty) through an aligned bounce buffer."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(-1, BOUNCE_BYTES)  # page-aligned, zero-filled, touched only as far as used
        self._bounce = np.frombuffer(self._map, dtype=np.uint8)
        self._fill = 0
        self.written = 0
        """Bytes already written to the file (whole bounce buffers)."""

    @property
    def pending(self) -> memoryview:
        """Bytes appended but not yet written (the start of the next bounce buffer)."""
        return memoryview(self._map)[:self._fill]

    def append(self, data: memoryview) -> None:
        """Append ``data``; full bounce buffers are written as they fill."""
        source = np.frombuffer(data, dtype=np.uint8)
        start = 0
        while start < len(source):
            count = min(len(source) - start, BOUNCE_BYTES - self._fill)
            self._bounce[self._fill:self._fill + count] = source[start:start + count]
            self._fill += count
            start += count
            if self._fill == BOUNCE_BYTES:
                self._write(BOUNCE_BYTES)

    def finish(self, size: int) -> None:
        """Write what is pending (zero-padded to a block) and cut the file back to ``size`` bytes."""
        if self._fill:
            padded = -(-self._fill // ALIGN) * ALIGN
            self._bounce[self._fill:padded] = 0
            self._write(padded)
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        """Release the bounce buffer and the descriptor."""
        self._bounce = None  # type: ignore[assignment]  # drop the export before closing the map
        self._map.close()
        os.close(self.fd)

    def _write(self, length: int) -> None:
        view = memoryview(self._map)[:length]
        try:
            while len(view):
                count = os.write(self.fd, view)
                view = view[count:]
                self.written += count
        finally:
            view.release()
        self._fill = 0
