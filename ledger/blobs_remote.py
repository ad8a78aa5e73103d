"""Blobs in object storage: :class:`FsspecBlobStore` for ``s3://bucket/prefix`` and other fsspec URLs.

An object store has no rename, so atomicity comes from the store itself: an S3
object is visible only once its single PUT or its multipart upload *completes*. A
blob is streamed into :class:`MultipartUpload` — hashed (xxh3) as it goes, sent as
a single PUT when it is small, as parts uploaded a few at a time while the writer
keeps writing when it is large — and completed only when the ``with`` block exits
cleanly. If the block raises (or the process dies), the upload is never completed:
nothing is visible, and ``gc`` aborts what a killed writer left
(:meth:`FsspecBlobStore.unfinished_uploads`).

Other fsspec protocols (``gcs://``, ``memory://``, …) write to a temporary name and
move it into place, which is atomic where the filesystem's move is.

Housekeeping calls on S3 — a listing (page by page), a delete, aborting an unfinished
upload — each have a deadline (:attr:`FsspecBlobStore.housekeeping_deadline_s`, 20 s):
a stopped or frozen server fails them with :class:`~ledger.errors.BlobStoreTimeoutError`
instead of holding the caller through the client's retries for minutes
(:mod:`ledger.store_deadline`).

Credentials are never in the URL (:func:`check_blob_url` refuses one that carries
them) and never stored or printed: s3fs/botocore find endpoint and keys in the
standard places (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``~/.aws``), and fsspec applies its own config (``~/.config/fsspec``, ``FSSPEC_S3_*``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any, BinaryIO, Iterator
from urllib.parse import urlsplit

from ledger import shard_codecs
from ledger.blobs import (
    HASH_ALGO,
    BlobWriter,
    BlobStore,
    HashProgress,
    _algo_to_verify,
    format_hash,
    hash_stream,
    new_hasher,
)
from ledger.errors import BlobStoreError, CorruptBlobError, LedgerWriteError
from ledger.store_deadline import HOUSEKEEPING_DEADLINE_S, Deadline

#: Size of each part of a multipart upload (S3 needs >= 5 MiB for all but the last); a blob no
#: larger than one part is sent as a single PUT.
PART_BYTES = 16 << 20
#: Parts of one blob in flight at once: enough to keep the connection busy while the writer
#: fills the next part, bounded so memory stays at a few parts per writer.
MAX_PARTS_IN_FLIGHT = 4
#: Bytes per ranged GET while hashing or reading sequentially.
READ_BYTES = 8 << 20
#: Seconds a request past its deadline gets to finish being cancelled on the client's loop.
_CANCEL_GRACE_S = 2.0
_S3_PROTOCOLS = ("s3", "s3a")
#: Query keys and user-info are where credentials hide in URLs; neither is accepted.
try:  # botocore's transport errors (connection refused, timeouts) are not OSErrors
    from botocore.exceptions import BotoCoreError as _BotoCoreError

    STORE_ERRORS: tuple[type[BaseException], ...] = (OSError, _BotoCoreError)
except ImportError:
    STORE_ERRORS = (OSError,)
_SECRET_HINT = "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or ~/.aws, or fsspec's config) instead"


def check_blob_url(url: str) -> str:
    """``url`` if it is a usable blob-store URL without credentials; ``ValueError`` (one line) otherwise.

    The message never repeats the URL's user-info or query: that is where a secret would be.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not scheme:
        raise ValueError("a blob URL needs a scheme such as s3:// (s3://bucket/prefix), or give a local path")
    if "@" in parts.netloc or parts.password is not None:
        raise ValueError(f"blob URL {scheme}://… embeds credentials; remove them from the URL and {_SECRET_HINT}")
    if parts.query or parts.fragment:
        raise ValueError(f"blob URL {scheme}://{parts.netloc}{parts.path} must not carry a query or fragment "
                         f"(options and credentials do not belong in it); {_SECRET_HINT}")
    if scheme in _S3_PROTOCOLS and not parts.netloc:
        raise ValueError(f"blob URL {url!r} names no bucket; use s3://bucket/prefix")
    return url.rstrip("/")


def _filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the root path inside it."""
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"blob URL {url!r} needs fsspec: pip install 'ckpt-ledger[s3]'") from None
    protocol = urlsplit(url).scheme.lower()
    options: dict[str, Any] = {}
    if protocol in _S3_PROTOCOLS:
        # Listings are decisions' inputs (gc, audit): never answer them from a stale cache.
        # Bounded timeouts and retries so a dead endpoint fails a save in seconds, not minutes.
        # A fresh instance per store: fsspec's instance cache would keep an endpoint taken from
        # the environment of an earlier store.
        options = {"use_listings_cache": False, "skip_instance_cache": True,
                   "config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                                     "retries": {"max_attempts": 3, "mode": "standard"}}}
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as err:
        raise ValueError(f"blob URL {protocol}://… needs a package fsspec could not import ({err}); "
                         "for s3:// pip install 'ckpt-ledger[s3]'") from None
    except ValueError as err:
        raise ValueError(f"blob URL {protocol}://…: {err}") from None
    return fs, root.rstrip("/")


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


class FsspecBlobStore(BlobStore):
    """Blobs as objects under an fsspec URL (``s3://bucket/prefix``: ``prefix/blobs/...`` in the bucket)."""

    #: Part size of multipart uploads (and the largest blob sent as one PUT).
    part_bytes: int = PART_BYTES
    #: Seconds one housekeeping call on S3 may take — a whole listing (checked between its pages),
    #: one delete, aborting the unfinished uploads of one location — before it is cancelled with
    #: :class:`~ledger.errors.BlobStoreTimeoutError`. ``None``: no deadline (the client's own
    #: timeouts and retries only). Set it on an instance, e.g. higher for ``gc`` of a huge bucket.
    housekeeping_deadline_s: float | None = HOUSEKEEPING_DEADLINE_S
    #: Keys per page of a listing (S3 answers at most 1000); the deadline is checked between pages.
    list_page_keys: int = 1000

    def __init__(self, url: str) -> None:
        self.url = check_blob_url(url)
        self.fs, self.root = _filesystem(self.url)
        self.protocol = urlsplit(self.url).scheme.lower()
        self.is_s3 = self.protocol in _S3_PROTOCOLS

    def describe(self) -> str:
        return self.url

    def _path(self, location: str) -> str:
        if location.startswith("/") or ".." in location.split("/"):
            raise ValueError(f"blob location {location!r} escapes the blob root")
        return f"{self.root}/{location}"

    # -- writing ---------------------------------------------------------------------------

    def open_atomic(self, location: str) -> BlobWriter:
        if self.is_s3:
            return MultipartUpload(self, self._path(location), part_bytes=self.part_bytes)
        return _TempThenMove(self, self._path(location))

    def delete(self, location: str) -> None:
        """Remove the object (no error if already gone); on S3 within :attr:`housekeeping_deadline_s`."""
        path = self._path(location)
        try:
            if self.is_s3:
                bucket, key, _ = self.fs.split_path(path)
                self._ask("delete_object", self._deadline(f"deleting {self.url}/{location}"), Bucket=bucket, Key=key)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        except BlobStoreError:
            raise
        except STORE_ERRORS as err:
            raise BlobStoreError(f"could not delete {self.url}/{location}: {_one_line(err)}") from err

    # -- housekeeping requests with a deadline ---------------------------------------------

    def _deadline(self, what: str) -> Deadline:
        return Deadline(self.housekeeping_deadline_s, what)

    def _ask(self, method: str, deadline: Deadline, /, progress: str = "", **kwargs: Any) -> Any:
        """One S3 request, given what is left of ``deadline``; past it, the request is cancelled on the
        client's loop and :class:`~ledger.errors.BlobStoreTimeoutError` raised (``progress``: how far the
        call got, for its message). Other errors are the client's own (``FileNotFoundError`` for a missing
        key or bucket): the caller translates them."""
        deadline.check(progress)
        left = deadline.remaining()
        call = self.fs._call_s3(method, **kwargs)
        if left is not None:  # cancelled inside the loop, so the connection is dropped, not left waiting
            call = asyncio.wait_for(call, left)
        future = asyncio.run_coroutine_threadsafe(call, self.fs.loop)
        try:
            return future.result(None if left is None else left + _CANCEL_GRACE_S)
        except (asyncio.TimeoutError, FutureTimeoutError, TimeoutError):
            future.cancel()
            if deadline.expired():
                raise deadline.error(progress) from None
            raise

    # -- reading ---------------------------------------------------------------------------

    def open_read(self, location: str) -> BinaryIO:
        """A seekable file over the object: reads are ranged GETs of ``READ_BYTES`` at a time."""
        path = self._path(location)
        try:
            return self.fs.open(path, "rb", block_size=READ_BYTES)
        except FileNotFoundError:
            raise CorruptBlobError(f"shard {location} is missing from {self.url}", location=location,
                                   expected_hash=None, found_hash=None) from None
        except STORE_ERRORS as err:
            raise BlobStoreError(f"could not open {self.url}/{location}: {_one_line(err)}") from err

    def read(self, location: str, *, expected_hash: str | None = None, codec: str = "none") -> bytes:
        try:
            data = self.fs.cat_file(self._path(location))
        except FileNotFoundError:
            raise CorruptBlobError(f"shard {location} is missing from {self.url}", location=location,
                                   expected_hash=expected_hash, found_hash=None) from None
        if expected_hash is not None:
            algo = _algo_to_verify(location, expected_hash)
            hasher = new_hasher(algo)
            hasher.update(data)
            found = format_hash(hasher, algo)
            if found != expected_hash:
                raise CorruptBlobError(f"shard {location} hash {found} does not match the ledger's {expected_hash}",
                                       location=location, expected_hash=expected_hash, found_hash=found)
        return shard_codecs.decode(data, codec, location=location)

    def hash_file(self, location: str, algo: str = HASH_ALGO,
                  progress: HashProgress | None = None) -> tuple[str, int]:
        with self.open_read(location) as stream:
            try:
                return hash_stream(stream, algo, progress, chunk_bytes=READ_BYTES)
            except STORE_ERRORS as err:
                raise BlobStoreError(f"could not read {self.url}/{location}: {_one_line(err)}") from err

    def exists(self, location: str) -> bool:
        return self.size(location) is not None

    def size(self, location: str) -> int | None:
        try:
            info = self.fs.info(self._path(location))
        except FileNotFoundError:
            return None
        except STORE_ERRORS as err:
            raise BlobStoreError(f"could not stat {self.url}/{location}: {_one_line(err)}") from err
        return int(info["size"]) if info.get("type", "file") == "file" else None

    def list_files(self) -> Iterator[str]:
        """Every object under ``blobs/``; on S3 page by page, the whole listing within
        :attr:`housekeeping_deadline_s` (checked between pages)."""
        base = f"{self.root}/blobs"
        try:
            if self.is_s3:
                yield from self._list_s3(base)
                return
            found = self.fs.find(base)
        except FileNotFoundError:
            return
        except BlobStoreError:
            raise
        except STORE_ERRORS as err:
            raise BlobStoreError(f"could not list {self.url}/blobs: {_one_line(err)}") from err
        prefix = f"{self.root}/"
        for path in sorted(found):
            path = path.lstrip("/") if not self.root.startswith("/") else path
            if path.startswith(prefix):
                yield path[len(prefix):]

    def _list_s3(self, base: str) -> Iterator[str]:
        deadline = self._deadline(f"listing {self.url}/blobs")
        bucket, key, _ = self.fs.split_path(base)
        root_key = key[:-len("blobs")]  # "prefix/" of the URL, or "" at the bucket's top
        continuation: dict[str, str] = {}
        pages = 0
        while True:
            page = self._ask("list_objects_v2", deadline, f"{pages} page(s) of {self.list_page_keys} keys listed",
                             Bucket=bucket, Prefix=f"{key}/", MaxKeys=self.list_page_keys, **continuation)
            pages += 1
            for item in page.get("Contents", []):
                name = item["Key"]
                if name.startswith(root_key) and not name.endswith("/"):  # "dir/" keys are folder markers
                    yield name[len(root_key):]
            if not page.get("IsTruncated"):
                return
            continuation = {"ContinuationToken": page["NextContinuationToken"]}

    # -- unfinished multipart uploads --------------------------------------------------------

    def _uploads(self, key_prefix: str, deadline: Deadline) -> list[tuple[str, str]]:
        """``(key, upload id)`` of every multipart upload under ``key_prefix`` never completed or aborted."""
        bucket, prefix, _ = self.fs.split_path(f"{self.root}/{key_prefix}")
        found: list[tuple[str, str]] = []
        marker: dict[str, str] = {}
        while True:
            try:
                page = self._ask("list_multipart_uploads", deadline, Bucket=bucket, Prefix=prefix, **marker)
            except BlobStoreError:
                raise
            except STORE_ERRORS as err:
                raise BlobStoreError(f"could not list unfinished uploads under {self.url}: {_one_line(err)}") from err
            found += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return found
            marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def unfinished_uploads(self) -> list[str]:
        if not self.is_s3:
            return []
        _, root_key, _ = self.fs.split_path(f"{self.root}/x")
        root_key = root_key[:-1]  # the key prefix of the root, with its trailing slash
        deadline = self._deadline(f"listing unfinished uploads under {self.url}")
        return sorted({key[len(root_key):] for key, _ in self._uploads("blobs/", deadline) if key.startswith(root_key)})

    def abort_uploads(self, location: str) -> None:
        if not self.is_s3:
            return
        bucket, key, _ = self.fs.split_path(self._path(location))
        deadline = self._deadline(f"aborting the unfinished uploads of {self.url}/{location}")
        for found_key, upload_id in self._uploads(location, deadline):
            if found_key == key:
                self.abort_upload(bucket, key, upload_id, deadline)

    def abort_upload(self, bucket: str, key: str, upload_id: str, deadline: Deadline | None = None) -> None:
        """Abort one multipart upload (no error if it is already gone), within ``deadline``."""
        try:
            self._ask("abort_multipart_upload", deadline or self._deadline(f"aborting an upload to {self.url}"),
                      Bucket=bucket, Key=key, UploadId=upload_id)
        except FileNotFoundError:
            pass  # already gone (aborted or completed by someone else)
        except BlobStoreError:
            raise
        except STORE_ERRORS as err:
            raise BlobStoreError(f"could not abort an upload to {self.url}: {_one_line(err)}") from err


class MultipartUpload(BlobWriter):
    """One S3 object written as a stream: single PUT if small, else a multipart upload whose parts
    go out while later bytes are still being written. Visible only after a clean exit."""

    def __init__(self, store: FsspecBlobStore, path: str, *, part_bytes: int = PART_BYTES,
                 max_in_flight: int = MAX_PARTS_IN_FLIGHT) -> None:
        self._store = store
        self._fs = store.fs
        self._path = path
        self.location = path[len(store.root) + 1:]
        self._bucket, self._key, _ = self._fs.split_path(path)
        self._part_bytes = part_bytes
        self._max_in_flight = max_in_flight
        self._hasher = new_hasher()
        self._pending = bytearray()  # the start of the next part (shorter than a part)
        self._in_flight: deque[tuple[int, Future]] = deque()
        self._parts: list[dict[str, Any]] = []
        self._upload_id: str | None = None
        self._next_part = 1
        self.size = 0
        self.hash = ""

    def write(self, data: bytes | memoryview) -> int:
        """Hash ``data`` and queue it; every full part is sent (concurrently) as soon as it fills."""
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        count = len(view)
        self.size += count
        start = 0
        if self._pending:
            start = min(count, self._part_bytes - len(self._pending))
            self._pending += view[:start]
            if len(self._pending) < self._part_bytes:
                return count
            self._send(bytes(self._pending))
            self._pending = bytearray()
        while count - start >= self._part_bytes:  # whole parts straight from the caller's buffer
            self._send(bytes(view[start:start + self._part_bytes]))
            start += self._part_bytes
        self._pending += view[start:]
        return count

    def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return self._fs.call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs)
        except STORE_ERRORS as err:
            raise LedgerWriteError(f"could not upload {self._store.url} object {self._key}: "
                                   f"{method} failed: {_one_line(err)}") from err

    def _send(self, part: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload")["UploadId"]
        while len(self._in_flight) >= self._max_in_flight:
            self._collect_one()
        number = self._next_part
        self._next_part += 1
        call = self._fs._call_s3("upload_part", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                 PartNumber=number, Body=part)
        self._in_flight.append((number, asyncio.run_coroutine_threadsafe(call, self._fs.loop)))

    def _collect_one(self) -> None:
        number, future = self._in_flight.popleft()
        try:
            etag = future.result()["ETag"]
        except STORE_ERRORS as err:
            raise LedgerWriteError(f"could not upload {self._store.url} object {self._key}: part {number} failed: "
                                   f"{_one_line(err)}") from err
        self._parts.append({"PartNumber": number, "ETag": etag})

    def __enter__(self) -> "MultipartUpload":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._abandon()
            return
        try:
            if self._upload_id is None:  # never filled a part: one PUT, visible when it returns
                self._call("put_object", Body=bytes(self._pending))
            else:
                if self._pending:
                    self._send(bytes(self._pending))
                while self._in_flight:
                    self._collect_one()
                self._call("complete_multipart_upload", UploadId=self._upload_id,
                           MultipartUpload={"Parts": self._parts})
        except BaseException:
            self._abandon()
            raise
        self._pending = bytearray()
        self.hash = format_hash(self._hasher)

    def _abandon(self) -> None:
        """Never complete: cancel queued parts and abort the upload (gc finds it if even that fails)."""
        for _, future in self._in_flight:
            future.cancel()
        for _, future in self._in_flight:
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - the upload is being thrown away either way
                pass
        self._in_flight.clear()
        self._pending = bytearray()
        if self._upload_id is not None:
            try:
                self._store.abort_upload(self._bucket, self._key, self._upload_id)
            except STORE_ERRORS:
                pass  # the store is unreachable: the orphan upload stays invisible until gc aborts it


class _TempThenMove(BlobWriter):
    """For fsspec filesystems other than S3: write a temporary object, then move it into place."""

    def __init__(self, store: FsspecBlobStore, path: str) -> None:
        self._fs = store.fs
        self._final = path
        self.location = path[len(store.root) + 1:]
        head, _, name = path.rpartition("/")
        self._tmp = f"{head}/.{name}.{uuid.uuid4().hex}.tmp"
        self._fs.makedirs(head, exist_ok=True)
        self._fh = self._fs.open(self._tmp, "wb")
        self._hasher = new_hasher()
        self.size = 0
        self.hash = ""

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._fh.write(view)
        self._hasher.update(view)
        self.size += len(view)
        return len(view)

    def __enter__(self) -> "_TempThenMove":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._fh.close()
            if exc_type is None:
                self._fs.mv(self._tmp, self._final)
                self.hash = format_hash(self._hasher)
                return
        except STORE_ERRORS as err:
            raise LedgerWriteError(f"could not write {self._final}: {_one_line(err)}") from err
        finally:
            if not self.hash:
                try:
                    self._fs.rm_file(self._tmp)
                except STORE_ERRORS:
                    pass
