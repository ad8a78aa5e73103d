"""The upload bar of ``ckpt-ledger train``: rank 0's checkpoint file on its way to the blob store.

Every rank writes its own file; only the coordinator draws, so a terminal shows one bar
(rank 0's bytes stand for the save, as every rank's file is about the same size). It is
drawn only when the trainer is verbose and stderr is a terminal (:func:`ledger.progress.wanted`),
so a piped or logged run never sees it. The bar stays up until the store has the whole
file (the last parts of a multipart upload included), then clears itself.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from ledger import BlobStore, BlobWriter, LocalBlobStore
from ledger.progress import ByteProgress, byte_progress, wanted


def bar_label(blobs: BlobStore, checkpoint_id: str) -> str:
    """``uploading <id>`` to an object store, ``writing <id>`` to a directory."""
    return f"{'writing' if isinstance(blobs, LocalBlobStore) else 'uploading'} {checkpoint_id}"


def planned_bytes(items: Sequence[WriteItem]) -> int:
    """The tensor bytes DCP's plan gives this rank (its small pickled items are not known in advance)."""
    total = 0
    for item in items:
        if item.type != WriteItemType.BYTE_IO and item.tensor_data is not None:
            # The chunk this rank writes, not the whole (possibly sharded) tensor.
            total += math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize
    return total


@contextmanager
def upload_bar(label: str | None) -> Iterator[ByteProgress | None]:
    """A progress callback while the block runs, if a bar is to be drawn (``label`` given, stderr a terminal)."""
    with byte_progress(label or "", label is not None and wanted()) as progress:
        yield progress


class ReportingSink:
    """A :class:`~ledger.BlobWriter` that reports ``(bytes handed over, total)`` to a progress callback
    after each write; ``total`` ``None`` when unknown (a compressing codec). Reports never exceed it."""

    def __init__(self, sink: BlobWriter, progress: ByteProgress, total: int | None) -> None:
        self._sink = sink
        self._progress = progress
        self._total = total

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._sink.size

    def write(self, data: bytes | memoryview) -> int:
        """Write through, then report."""
        count = self._sink.write(data)
        self._report()
        return count

    def writev(self, buffers: "list[bytes | bytearray | memoryview]") -> int:
        """Write through, then report."""
        count = self._sink.writev(buffers)
        self._report()
        return count

    def _report(self) -> None:
        done = self._sink.size
        self._progress(done if self._total is None else min(done, self._total), self._total)
