"""DCP storage over any :class:`~ledger.blobs.BlobStore` (object storage included).

``torch.distributed.checkpoint``'s file-system reader and writer do all their I/O
through a small ``FileSystemBase`` (open a stream, join paths, rename, ...), the same
seam torch's own fsspec reader/writer use. :class:`BlobFileSystem` implements it on a
blob store, with blob *locations* as paths:

* a stream opened for writing is :meth:`BlobStore.open_atomic` — hashed while written,
  visible only once complete (an S3 multipart upload completes on a clean exit and is
  aborted otherwise) — and the size and hash of every blob written are remembered, so
  a rank reports its shards without reading them back;
* a stream opened for reading is :meth:`BlobStore.open_read` (ranged GETs on S3);
* ``rename`` (DCP renames ``.metadata.tmp`` into place) copies through the store, since
  object stores have none; ``.metadata`` is small.

No ``fsync`` is asked of these streams (``sync_files=False``): durability is the
store's completion of the write.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Any, Iterator

from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystemBase

from ledger.blobs import BlobStore, LocalBlobStore
from trainer.dcp_codec import reader_registry, writer_extensions

_COPY_BYTES = 8 << 20


class BlobFileSystem(FileSystemBase):
    """DCP's file-system interface on a blob store; paths are blob locations (``blobs/<ckpt>/e<n>/...``)."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self.written: dict[str, tuple[int, str]] = {}
        """Location -> (bytes, ``algo:hex``) of every blob this file system published."""

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[io.IOBase]:
        location = str(path)
        if mode == "rb":
            with self.blobs.open_read(location) as stream:
                yield stream
        elif mode == "wb":
            with self.blobs.open_atomic(location) as sink:
                yield sink  # type: ignore[misc]
            self.written[location] = (sink.size, sink.hash)
        else:
            raise ValueError(f"blob streams open 'rb' or 'wb', not {mode!r}")

    def concat_path(self, path: Any, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def rename(self, path: Any, new_path: Any) -> None:
        with self.create_stream(new_path, "wb") as sink, self.blobs.open_read(str(path)) as source:
            while chunk := source.read(_COPY_BYTES):
                sink.write(chunk)
        self.blobs.delete(str(path))
        self.written.pop(str(path), None)

    def init_path(self, path: Any) -> str:
        return str(path).rstrip("/")

    def mkdir(self, path: Any) -> None:
        """Object stores have no directories; a local store makes them as it writes."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False  # never picked by DCP's own storage inference: built explicitly only

    def exists(self, path: Any) -> bool:
        return self.blobs.exists(str(path))

    def rm_file(self, path: Any) -> None:
        self.blobs.delete(str(path))


class BlobStoreWriter(FileSystemWriter):
    """DCP's writer (one file per rank, the run's codec) publishing through a blob store."""

    def __init__(self, blobs: BlobStore, directory: str, codec: str = "none") -> None:
        super().__init__(directory, single_file_per_rank=True, sync_files=False, overwrite=True,
                         _extensions=writer_extensions(codec))
        self.fs = BlobFileSystem(blobs)
        self.path = self.fs.init_path(directory)


class BlobStoreReader(FileSystemReader):
    """DCP's reader (every codec) over a blob store."""

    def __init__(self, blobs: BlobStore, directory: str) -> None:
        super().__init__(directory, _extension_registry=reader_registry())
        self.fs = BlobFileSystem(blobs)
        self.path = self.fs.init_path(directory)


def dcp_reader(blobs: BlobStore, directory: str) -> FileSystemReader:
    """A DCP reader of the checkpoint whose ``.metadata`` is in ``directory`` (a blob location)."""
    if isinstance(blobs, LocalBlobStore):  # plain files: DCP's own reader, unchanged
        return FileSystemReader(blobs.path(directory), _extension_registry=reader_registry())
    return BlobStoreReader(blobs, directory)
