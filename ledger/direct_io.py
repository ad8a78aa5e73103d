"""Appending to a new file with ``O_DIRECT``: bytes go to the disk without filling the page cache.

Why: a checkpoint writes hundreds of MB into *new* files. Through the page cache, every
page of a new file must first be allocated — measured on the 2-core VM this project is
benchmarked on, 57 MB into a fresh file took a median 0.27 s (and grew as files
accumulated) against 0.07 s to overwrite an existing file and 0.05 s with ``O_DIRECT``.

Direct I/O needs the memory address, the file offset and the length of every write
aligned to the device's block size. :class:`DirectAppender` copies the caller's buffers
into page-aligned bounce buffers (reused from file to file; numpy copies, GIL released) and writes each full one
with ``pwrite`` on a helper thread while the next one fills (two buffers: the copy and
the disk overlap); the last block is zero-padded and the file truncated back to its true
size. Where the file system refuses ``O_DIRECT`` (the probe write when opening fails)
the caller writes the ordinary way.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

#: Alignment of addresses, offsets and lengths (a multiple of every common logical block size).
ALIGN = 4096
#: Bytes gathered before each write: large sequential writes, a small fixed amount of memory.
BOUNCE_BYTES = 4 << 20
#: Bounce buffers kept for the next file (their pages are touched once per process, not per file).
_POOL_SIZE = 4
_pool: list[mmap.mmap] = []
_pool_lock = threading.Lock()


def _take_buffer() -> mmap.mmap:
    with _pool_lock:
        if _pool:
            return _pool.pop()
    return mmap.mmap(-1, BOUNCE_BYTES)  # page-aligned


def _give_back(buffer: mmap.mmap) -> None:
    with _pool_lock:
        if len(_pool) < _POOL_SIZE:
            _pool.append(buffer)
            return
    buffer.close()


def open_direct(path: os.PathLike[str] | str) -> "DirectAppender | None":
    """A :class:`DirectAppender` on the existing, empty file ``path``, or ``None`` if the system refuses one.

    One aligned block of zeros is written at offset 0 to find out (it is overwritten or
    truncated away later).
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    probe = mmap.mmap(-1, ALIGN)
    try:
        os.pwrite(fd, probe, 0)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    finally:
        probe.close()
    return DirectAppender(fd)


class DirectAppender:
    """Appends to the file behind ``fd`` (opened with ``O_DIRECT``) through two aligned bounce buffers."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._maps = [_take_buffer(), _take_buffer()]
        self._arrays = [np.frombuffer(m, dtype=np.uint8) for m in self._maps]
        self._current = 0
        self._fill = 0
        self._offset = 0  # where the current buffer goes in the file
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-write")
        self._in_flight: Future[None] | None = None

    def append(self, data: memoryview) -> None:
        """Append ``data``; each full bounce buffer is handed to the writer thread."""
        source = np.frombuffer(data, dtype=np.uint8)
        start = 0
        while start < len(source):
            count = min(len(source) - start, BOUNCE_BYTES - self._fill)
            self._arrays[self._current][self._fill:self._fill + count] = source[start:start + count]
            self._fill += count
            start += count
            if self._fill == BOUNCE_BYTES:
                self._hand_off(BOUNCE_BYTES)

    def finish(self, size: int) -> None:
        """Write what is pending (zero-padded to a block), wait for every write, cut the file to ``size`` bytes."""
        if self._fill:
            padded = -(-self._fill // ALIGN) * ALIGN
            self._arrays[self._current][self._fill:padded] = 0
            self._hand_off(padded)
        self._wait()
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        """Stop the writer thread, release the buffers and the descriptor (after an error too)."""
        try:
            self._wait()
        except OSError:
            pass  # already reported by the write that failed, or irrelevant after an abort
        finally:
            self._writer.shutdown(wait=True)
            self._arrays = []
            for buffer in self._maps:
                _give_back(buffer)
            self._maps = []
            os.close(self.fd)

    def _hand_off(self, length: int) -> None:
        self._wait()  # the other buffer's write must be done before that buffer is refilled
        buffer, offset = self._maps[self._current], self._offset
        self._in_flight = self._writer.submit(_pwrite_all, self.fd, memoryview(buffer)[:length], offset)
        self._offset += length
        self._current ^= 1
        self._fill = 0

    def _wait(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """``pwrite`` every byte of ``view`` at ``offset`` (the GIL is released during each call)."""
    try:
        while len(view):
            count = os.pwrite(fd, view, offset)
            view, offset = view[count:], offset + count
    finally:
        view.release()
