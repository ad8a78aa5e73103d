"""Shard storage: atomic, content-hashed, attempt-namespaced files.

A write is durable and atomic: bytes go to a temp file in the destination
directory, the file is fsynced, renamed into place, and the directory is fsynced —
so a crash leaves either no file or a complete one. Every blob is hashed as it is
written (over the bytes as stored) and verified on read. Hashes are recorded as
``algo:hex``: new blobs use ``xxh3-128`` (the check guards against torn writes and bit
rot, not against an adversary, and at memory speed it does not double the time of a
checkpoint the way a cryptographic hash at ~200-500 MB/s would); ``blake2b`` (256-bit)
hashes recorded by earlier versions still verify.

Locations are relative strings (``blobs/<checkpoint>/e<epoch>/...``): the epoch in
the path means a stale attempt can never overwrite a live attempt's files.

:class:`BlobStore` is the small interface every backend implements;
:class:`LocalBlobStore` is the local-filesystem one and
:class:`ledger.blobs_remote.FsspecBlobStore` the object-storage one (``s3://…`` and any
fsspec URL). :func:`blob_store_for` picks one from what a run recorded.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple

import xxhash

from ledger import shard_codecs
from ledger.direct_io import open_direct
from ledger.errors import CorruptBlobError, LedgerWriteError
from ledger.faults import crash_point

#: The algorithm of newly written blobs.
HASH_ALGO = "xxh3-128"
#: Every algorithm a recorded hash may name, and how to start hashing with it.
HASHERS = {
    "xxh3-128": xxhash.xxh3_128,
    "blake2b": lambda: hashlib.blake2b(digest_size=32),
}
CODECS = shard_codecs.CODECS
#: Bytes read at a time when hashing a stored blob.
_HASH_CHUNK = 8 << 20
#: Buffers per ``writev`` call (POSIX guarantees at least 16; Linux allows 1024).
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 16
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def new_hasher(algo: str = HASH_ALGO) -> "hashlib._Hash":
    """A fresh content hasher (``update``/``hexdigest``) for ``algo``."""
    return HASHERS[algo]()


def format_hash(hasher: "hashlib._Hash", algo: str = HASH_ALGO) -> str:
    """The recorded form of a digest: ``algo:hex``."""
    return f"{algo}:{hasher.hexdigest()}"


def hash_algo_of(recorded: str) -> str:
    """The algorithm a recorded ``algo:hex`` hash was made with; ``ValueError`` if unknown."""
    algo, sep, _ = recorded.partition(":")
    if not sep or algo not in HASHERS:
        raise ValueError(f"hash {recorded[:40]!r} names no known algorithm (known: {', '.join(HASHERS)})")
    return algo


def _algo_to_verify(location: str, expected_hash: str) -> str:
    """The algorithm of a recorded hash; a hash that names none cannot vouch for the blob."""
    try:
        return hash_algo_of(expected_hash)
    except ValueError as err:
        raise CorruptBlobError(f"shard {location}: {err}", location=location, expected_hash=expected_hash,
                               found_hash=None) from None


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What was durably stored: enough to record a ``shard.written``."""

    location: str
    bytes: int
    hash: str
    codec: str


class BlobLocation(NamedTuple):
    """The parts of a location laid out by :meth:`BlobStore.checkpoint_dir`."""

    checkpoint_id: str
    epoch: int
    name: str


_LOCATION = re.compile(r"^blobs/(?P<cid>[^/]+)/e(?P<epoch>\d+)/(?P<name>.+)$")


def parse_location(location: str) -> BlobLocation | None:
    """``blobs/<checkpoint>/e<epoch>/<name>`` split into its parts; ``None`` for any other location."""
    match = _LOCATION.match(location)
    if match is None:
        return None
    return BlobLocation(match["cid"], int(match["epoch"]), match["name"])


#: ``progress(bytes_done)`` while a blob is hashed: called after each chunk with the running total.
HashProgress = Callable[[int], None]


def hash_stream(stream: BinaryIO, algo: str = HASH_ALGO, progress: HashProgress | None = None,
                chunk_bytes: int = _HASH_CHUNK) -> tuple[str, int]:
    """Hash a readable stream to its end in chunks: ``(algo:hex, bytes read)``."""
    hasher, size = new_hasher(algo), 0
    while chunk := stream.read(chunk_bytes):
        hasher.update(chunk)
        size += len(chunk)
        if progress is not None:
            progress(size)
    return format_hash(hasher, algo), size


def check_component(value: str, what: str) -> str:
    """Reject ids that could escape the blob root or collide (``..``, slashes, empty)."""
    if not _SAFE_ID.fullmatch(value):  # fullmatch: "$" alone lets a trailing newline through
        raise ValueError(f"{what} {value!r} must be letters, digits, '.', '_' or '-' and not start with a symbol")
    return value


class BlobWriter(ABC):
    """One blob being written: what :meth:`BlobStore.open_atomic` returns (a context manager).

    Semantics every backend keeps:

    * :meth:`write` appends bytes in order (any buffer: ``bytes``, ``bytearray``,
      ``memoryview``, a NumPy array) and hashes them on the way; it may return before the
      bytes are durable. A failed write raises :class:`~ledger.LedgerWriteError`.
    * Leaving the ``with`` block cleanly makes the blob durable and visible under
      ``location`` in one step (readers see either nothing or all of it); only then are
      :attr:`size` and :attr:`hash` final. A failure to make it durable raises
      :class:`~ledger.LedgerWriteError` and leaves nothing visible.
    * Leaving the block with an exception discards everything written: nothing becomes
      visible under ``location`` and no temporary object is left behind (best effort on
      remote stores: an incomplete multipart upload is aborted).
    * A blob already at ``location`` is replaced atomically.
    """

    location: str
    """Where the blob lands."""
    size: int
    """Bytes written so far (the blob's size once closed)."""
    hash: str
    """``algo:hex`` (:data:`HASH_ALGO`) of every byte written, in order; ``""`` until closed cleanly."""

    @abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data`` (hashing it); returns ``len(data)`` in bytes."""

    def writev(self, buffers: "list[bytes | bytearray | memoryview]") -> int:
        """Append several buffers in order (backends may gather them into fewer calls); total bytes."""
        return sum(self.write(buffer) for buffer in buffers)

    def __enter__(self) -> "BlobWriter":
        return self

    @abstractmethod
    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        """Commit (clean exit) or discard (exception): see the class docstring."""


class BlobStore(ABC):
    """Where shard bytes live. Implement the abstract methods for another backend.

    A backend implements :meth:`open_atomic` (streamed, atomic, hashed writes),
    :meth:`open_read` (seekable reads), :meth:`size`, :meth:`exists`, :meth:`delete` and
    :meth:`list_files`; :meth:`write`, :meth:`read`, :meth:`hash_file` and :meth:`verify`
    are built on those (override them where the backend can do better). Locations are
    relative ``/``-separated strings such as ``blobs/<checkpoint>/e<epoch>/<file>``.
    """

    #: What ``run.started.blobs`` records for this store (``None``: the run directory itself).
    url: str | None = None

    @abstractmethod
    def open_atomic(self, location: str) -> BlobWriter:
        """A :class:`BlobWriter` for ``location``: hashed as written, durable and visible on clean close only.

        Checkpoint files are written through this (``with store.open_atomic(loc) as w:
        w.write(buf)``); ``w.hash`` and ``w.size`` are what ``shard.written`` records.
        """

    @abstractmethod
    def open_read(self, location: str) -> BinaryIO:
        """The stored bytes of ``location`` as a seekable binary file (a context manager).

        It supports ``read(n)``, ``readinto(buffer)`` (filling as much of ``buffer`` as
        the blob has from the current position; ``0`` at the end), ``seek(offset,
        whence)``, ``tell()`` and ``close()``. No verification happens here (use
        :meth:`verify` or hash what you read). Raises :class:`CorruptBlobError` (with
        ``found_hash=None``) when nothing is stored at ``location``.
        """

    @abstractmethod
    def size(self, location: str) -> int | None:
        """Stored size in bytes, or ``None`` when nothing is stored at ``location``."""

    def map_read(self, location: str) -> memoryview | None:
        """The stored bytes as a read-only ``memoryview`` without copying them, or ``None``.

        Optional: a backend that can map a blob into memory (a local file) returns the
        mapping (valid as long as the view is referenced); the default, ``None``, tells the
        caller to read through :meth:`open_read` instead.
        """
        return None

    @abstractmethod
    def exists(self, location: str) -> bool:
        """Whether a blob is stored at ``location``."""

    @abstractmethod
    def delete(self, location: str) -> None:
        """Remove a blob (no error if already gone)."""

    @abstractmethod
    def list_files(self) -> Iterator[str]:
        """Every stored location (audit uses this to find orphans; nothing is *decided* from it)."""

    def write(self, location: str, data: bytes | memoryview, *, codec: str = "none", level: int = 3) -> BlobInfo:
        """Durably and atomically store ``data`` (encoded by ``codec``) at ``location``."""
        payload = shard_codecs.encode(data, codec, level=level)
        with self.open_atomic(location) as sink:
            sink.write(payload)
        return BlobInfo(location=location, bytes=sink.size, hash=sink.hash, codec=codec)

    def read(self, location: str, *, expected_hash: str | None = None, codec: str = "none") -> bytes:
        """Return the decoded bytes, verifying ``expected_hash`` first (raises :class:`CorruptBlobError`)."""
        try:
            with self.open_read(location) as fh:
                data = fh.read()
        except CorruptBlobError as err:
            raise CorruptBlobError(str(err), location=location, expected_hash=expected_hash,
                                   found_hash=None) from None
        if expected_hash is not None:
            algo = _algo_to_verify(location, expected_hash)
            hasher = new_hasher(algo)
            hasher.update(data)
            found = format_hash(hasher, algo)
            if found != expected_hash:
                raise CorruptBlobError(
                    f"shard {location} hash {found} does not match the ledger's {expected_hash}",
                    location=location, expected_hash=expected_hash, found_hash=found,
                )
        return shard_codecs.decode(data, codec, location=location)

    def hash_file(self, location: str, algo: str = HASH_ALGO,
                  progress: HashProgress | None = None) -> tuple[str, int]:
        """The stored blob's content hash (``algo:hex``) and size in bytes, streamed.

        ``progress(bytes_so_far)`` is called as it goes. :class:`CorruptBlobError` when missing.
        """
        with self.open_read(location) as fh:
            return hash_stream(fh, algo, progress)

    def unfinished_uploads(self) -> list[str]:
        """Locations with an upload begun and never completed (multipart uploads of a killed
        writer): invisible as blobs, but holding storage until aborted. Default: none."""
        return []

    def abort_uploads(self, location: str) -> None:
        """Abort every unfinished upload to ``location`` (no error if there is none)."""

    def describe(self) -> str:
        """Where the blobs are, for messages (never any credential)."""
        return self.url or "the run directory"

    def checkpoint_dir(self, checkpoint_id: str, epoch: int) -> str:
        """The location prefix where attempt ``epoch`` writes checkpoint ``checkpoint_id``."""
        return f"blobs/{check_component(checkpoint_id, 'checkpoint id')}/e{int(epoch)}"

    def verify(self, location: str, expected_hash: str, expected_bytes: int | None = None,
               progress: HashProgress | None = None) -> None:
        """Raise :class:`CorruptBlobError` unless the stored blob has this hash (and size).

        The one hash check of stored blobs: load, export, commit-time checks and
        ``audit --verify-blobs`` all go through it. ``progress(bytes_so_far)`` as it hashes.
        """
        algo = _algo_to_verify(location, expected_hash)
        try:
            found, size = self.hash_file(location, algo, progress)
        except CorruptBlobError:  # nothing stored there
            raise CorruptBlobError(
                f"shard {location} is missing", location=location, expected_hash=expected_hash, found_hash=None
            ) from None
        if expected_bytes is not None and size != expected_bytes:
            raise CorruptBlobError(
                f"shard {location} has {size} bytes, the ledger recorded {expected_bytes}",
                location=location, expected_hash=expected_hash, found_hash=found,
            )
        if found != expected_hash:
            raise CorruptBlobError(
                f"shard {location} hash {found} does not match the ledger's {expected_hash}",
                location=location, expected_hash=expected_hash, found_hash=found,
            )


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobStore(BlobStore):
    """Blobs as files under ``root`` (normally the run directory)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, location: str) -> Path:
        """The local file of a location (refuses locations that escape the root)."""
        resolved = (self.root / location).resolve()
        root = self.root.resolve()
        if root != resolved and root not in resolved.parents:
            raise ValueError(f"blob location {location!r} escapes the run directory")
        return resolved

    def open_atomic(self, location: str) -> "AtomicFile":
        """A file that hashes as it is written and lands atomically and durably on close."""
        return AtomicFile(self.path(location), location)

    def open_read(self, location: str) -> BinaryIO:
        """The file itself, unbuffered (large ``readinto`` calls go straight to the kernel)."""
        try:
            return open(self.path(location), "rb", buffering=0)
        except FileNotFoundError:
            raise CorruptBlobError(
                f"shard {location} is missing", location=location, expected_hash=None, found_hash=None
            ) from None

    def map_read(self, location: str) -> memoryview | None:
        """The file mapped read-only (pages the page cache holds are not copied); missing: ``CorruptBlobError``."""
        try:
            with open(self.path(location), "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    return memoryview(b"")
                return memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))  # the view keeps the map
        except FileNotFoundError:
            raise CorruptBlobError(
                f"shard {location} is missing", location=location, expected_hash=None, found_hash=None
            ) from None

    def hash_file(self, location: str, algo: str = HASH_ALGO,
                  progress: HashProgress | None = None) -> tuple[str, int]:
        hasher, size = new_hasher(algo), 0
        buffer = bytearray(_HASH_CHUNK)
        view = memoryview(buffer)
        with self.open_read(location) as fh:
            while count := fh.readinto(buffer):
                hasher.update(view[:count])  # xxhash releases the GIL while hashing
                size += count
                if progress is not None:
                    progress(size)
        return format_hash(hasher, algo), size

    def exists(self, location: str) -> bool:
        return self.path(location).is_file()

    def size(self, location: str) -> int | None:
        """Stored size in bytes, or ``None`` when missing."""
        try:
            return self.path(location).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, location: str) -> None:
        target = self.path(location)
        target.unlink(missing_ok=True)
        # Prune now-empty directories up to blobs/, so a deleted checkpoint leaves nothing behind.
        parent, stop = target.parent, (self.root / "blobs").resolve()
        while parent != stop and stop in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list_files(self) -> Iterator[str]:
        base = self.root / "blobs"
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                yield Path(dirpath, name).relative_to(self.root).as_posix()


class AtomicFile(BlobWriter):
    """Write-then-rename file with a running content hash (use as a context manager).

    Bytes go to the disk with ``O_DIRECT`` through an aligned bounce buffer
    (:mod:`ledger.direct_io`: new files written through the page cache are several times
    slower here), or, where the file system refuses direct I/O, straight to the file
    descriptor (no Python-side buffer), many small buffers gathered per ``writev``. On a
    clean close: one ``fsync`` of the file, the rename, one ``fsync`` of the directory —
    with a crash point after each step.
    """

    def __init__(self, final: Path, location: str | None = None) -> None:
        self.final = final
        self.location = location if location is not None else final.name
        self.size = 0
        self.hash = ""
        self._hasher = new_hasher()
        final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            self._direct = open_direct(self._tmp)  # None where the file system refuses O_DIRECT
        except OSError as err:  # the probe write failed for another reason (no space, I/O error)
            os.close(self._fd)
            self._tmp.unlink(missing_ok=True)
            raise LedgerWriteError(f"could not write shard {self.final}: {err}") from err

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append bytes (hashing them on the way)."""
        view = memoryview(data).cast("B")
        self._append([view])
        self._hasher.update(view)
        self.size += len(view)
        return len(view)

    def writev(self, buffers: "list[bytes | bytearray | memoryview]") -> int:
        """Append several buffers in order (without direct I/O: as few ``writev`` calls as the system allows)."""
        views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
        self._append(views)
        for view in views:
            self._hasher.update(view)  # xxhash releases the GIL
        total = sum(len(v) for v in views)
        self.size += total
        return total

    def _append(self, views: list[memoryview]) -> None:
        try:
            if self._direct is not None:
                for view in views:
                    self._direct.append(view)
                return
            for start in range(0, len(views), _IOV_MAX):
                batch = views[start:start + _IOV_MAX]
                written = os.writev(self._fd, batch)
                if written < sum(len(v) for v in batch):  # a short write: finish it buffer by buffer
                    _finish_short_writev(self._fd, batch, written)
        except OSError as err:
            raise LedgerWriteError(f"could not write shard {self.final}: {err}") from err

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._close_fds()
            self._tmp.unlink(missing_ok=True)
            return
        try:
            if self._direct is not None:
                self._direct.finish(self.size)
            crash_point("blob.after_temp_write")
            os.fsync(self._fd)
            self._close_fds()
            crash_point("blob.after_fsync")
            os.replace(self._tmp, self.final)
            crash_point("blob.after_rename")
            fsync_dir(self.final.parent)
            crash_point("blob.after_dir_fsync")
        except OSError as err:
            # fsync failing is never retried hoping it worked: the pages may already be dropped.
            self._close_fds()
            self._tmp.unlink(missing_ok=True)
            raise LedgerWriteError(f"could not durably write shard {self.final}: {err}") from err
        self.hash = format_hash(self._hasher)

    def _close_fds(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, view: memoryview) -> None:
    """``os.write`` until every byte is written (a write may be short; the GIL is released inside)."""
    while len(view):
        written = os.write(fd, view)
        view = view[written:]


def _finish_short_writev(fd: int, batch: list[memoryview], written: int) -> None:
    """After a ``writev`` wrote only ``written`` bytes of ``batch``, write the rest."""
    for view in batch:
        if written >= len(view):
            written -= len(view)
            continue
        _write_all(fd, view[written:])
        written = 0


def blob_store_for(url_or_path: str | os.PathLike[str] | None, run_dir: str | os.PathLike[str]) -> BlobStore:
    """The blob store a run uses: the run directory itself (``None``), a local directory, or any
    fsspec URL such as ``s3://bucket/prefix`` (needs ``ckpt-ledger[s3]``).

    Credentials are never part of the URL: one that embeds them is refused (``ValueError``);
    endpoint and keys come from the standard places (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, fsspec's config).
    """
    if url_or_path is None or str(url_or_path) == "":
        return LocalBlobStore(run_dir)
    text = os.fspath(url_or_path)
    if "://" not in text:
        store = LocalBlobStore(Path(text).expanduser())
        store.url = text
        return store
    from ledger.blobs_remote import FsspecBlobStore, check_blob_url  # fsspec is an optional extra

    url = check_blob_url(text)
    if url.startswith("file://"):
        store = LocalBlobStore(Path(url[len("file://"):]))
        store.url = url
        return store
    return FsspecBlobStore(url)
