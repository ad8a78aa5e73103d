"""Bytes to disk for the checkpoint benchmarks: the background save of ``bench/async_worker.py``
and the raw-write floor both worker and trainer benchmarks compare against.

A spawned process imports the module its target lives in; keeping the target here (no
``@benchmark``, no torch) means the child registers nothing and starts quickly.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

CHUNK = 4 << 20


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_staged(staged: memoryview, header: bytes, path: str) -> tuple[str, float]:
    """Serialize (header, then the raw bytes), blake2b-hash and durably write; ``(hex digest, seconds)``."""
    start = time.perf_counter()
    digest = hashlib.blake2b(digest_size=32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for piece in (struct.pack("<Q", len(header)), header):
            digest.update(piece)
            _write_all(fd, piece)
        for offset in range(0, len(staged), CHUNK):
            chunk = staged[offset:offset + CHUNK]
            digest.update(chunk)  # releases the GIL for buffers >= 2 KiB, as os.write does
            _write_all(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest(), time.perf_counter() - start


def write_raw(staged: memoryview, path: str) -> None:
    """The floor of durably writing ``staged``: sequential writes to one file, then fsync (no hash, no header)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, len(staged), CHUNK):
            _write_all(fd, staged[offset:offset + CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def serve_saves(conn: Connection, shm_name: str, nbytes: int, header: bytes) -> None:
    """The process variant: attach to the staging block once, then write one file per path received."""
    # A spawned child shares its parent's resource tracker: the parent's unlink unregisters the block.
    shm = SharedMemory(name=shm_name)
    staged = shm.buf[:nbytes]
    conn.send("ready")
    try:
        while (path := conn.recv()) is not None:
            conn.send(write_staged(staged, header, path))
    finally:
        staged.release()
        shm.close()
