"""Checkpoint files: a DCP ``StorageWriter``/``StorageReader`` pair over a :class:`~ledger.BlobStore`.

``torch.distributed.checkpoint`` (DCP) plans what every rank writes and where every
item lives; these classes only move bytes. The layout:

* one file per rank, ``<directory>/__<rank>_0.distcp``, written through
  ``BlobStore.open_atomic``: the rank's ``BYTE_IO`` items first (small pickles), then
  every tensor item as its **raw bytes** (C order, no ``torch.save`` container), each
  starting at a multiple of 64 bytes. The bytes go from the tensors' own memory (the
  staging buffers of an async save) to the file in large gathered ``writev`` calls, and
  are hashed (xxh3-128, GIL released) on the way; closing the writer is one ``fsync`` of
  the file, the rename and one ``fsync`` of the directory.
* ``<directory>/.metadata``, written last by the coordinator: DCP's own pickled
  ``Metadata``, whose per-item ``_StorageInfo`` records file, offset, length and the
  transform descriptors. A raw tensor item carries the descriptor
  ``raw-tensor@ckpt-ledger/1;dtype=..;shape=..`` (``trainer.dcp_codec.RawTensorBytes``),
  after the checkpoint codec's descriptor when the run compresses (the codec then
  encodes the raw bytes).

Reading (:class:`LedgerStorageReader`) goes through ``BlobStore.open_read``: per file,
items in offset order; an uncompressed raw item that a rank needs whole lands with one
``readinto`` straight into the destination tensor. Checkpoints written by earlier
versions (``torch.save`` containers, no raw descriptor) are read as DCP reads them.

Stock DCP tools: ``FileSystemReader(dir, _extension_registry=reader_registry())`` reads
these checkpoints (slowly: it rebuilds a ``torch.save`` container per item); without our
registry — e.g. ``dcp_to_torch_save`` — DCP refuses with "Unknown extension
name='raw-tensor@ckpt-ledger'". ``ckpt-ledger export`` reads them.
"""

from __future__ import annotations

import dataclasses
import io
import pickle

from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.distributed.checkpoint._extension import ExtensionRegistry
from torch.futures import Future

from ledger import BlobStore, CorruptBlobError
from ledger.blobs import BlobWriter
from trainer.dcp_codec import RawTensorBytes, reader_registry, writer_extensions
from trainer.run_recorder import ShardFact
from trainer.upload_progress import ReportingSink, planned_bytes, upload_bar

#: The file DCP's coordinator writes last, describing where every item lives.
DCP_METADATA_FILE = ".metadata"
#: Every tensor item starts at a multiple of this many bytes of its file.
ITEM_ALIGNMENT = 64
#: Gathered buffers are handed to the writer in batches of about this many bytes.
_WRITE_BATCH_BYTES = 64 << 20
_ZEROS = bytes(ITEM_ALIGNMENT)
_CURRENT_DCP_VERSION = "1.0.0"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor's elements in C order, without a copy when it is contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class _SinkStream(io.RawIOBase):
    """A file-like over a :class:`BlobWriter` for codecs (which write in pieces); closing it is a no-op."""

    def __init__(self, sink: BlobWriter) -> None:
        super().__init__()
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # noqa: ANN401 - any buffer
        return self._sink.write(b)

    def close(self) -> None:  # the codec closes its output when its frame ends; the file stays open
        pass


class LedgerStorageWriter(StorageWriter):
    """DCP writer: one raw-layout file per rank into ``directory`` of ``blobs`` (see the module docstring).

    After ``dcp.save``, :attr:`written` holds this rank's files (location, bytes, hash) —
    what the rank reports for ``shard.written``. ``codec`` is one of
    ``trainer.dcp_codec.CHECKPOINT_CODECS``. ``progress_label``: draw a bar with this label
    while the rank's file is written, if stderr is a terminal (:mod:`trainer.upload_progress`).
    """

    def __init__(self, blobs: BlobStore, directory: str, codec: str = "none", *,
                 progress_label: str | None = None) -> None:
        super().__init__()
        self.blobs = blobs
        self.directory = directory.rstrip("/")
        self.codec = codec
        self.progress_label = progress_label
        self._extensions = writer_extensions(codec)
        self.rank = 0
        self.use_collectives = True
        self.written: list[ShardFact] = []

    def reset(self, checkpoint_id: Any = None) -> None:  # noqa: ANN401 - DCP's signature
        """A new save (the directory was given to the constructor; DCP's ``checkpoint_id`` is not used)."""
        self.written = []

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Learn this rank's number (DCP passes it as a keyword)."""
        self.rank = kwargs.get("rank") or 0
        self.use_collectives = kwargs.get("use_collectives", True)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Nothing to add locally (without collectives, name the file after the rank here)."""
        if not self.use_collectives:
            return dataclasses.replace(plan, storage_data=_StoragePrefix(f"__{self.rank}_"))
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Give every rank its file name prefix, ``__<rank>_``, as DCP's file-system writer does."""
        return [plan if plan.storage_data is not None
                else dataclasses.replace(plan, storage_data=_StoragePrefix(f"__{i}_"))
                for i, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's items into its one file; the future is already done."""
        name = f"{plan.storage_data.prefix}0.distcp"
        location = f"{self.directory}/{name}"
        items = sorted(plan.items, key=lambda item: item.type != WriteItemType.BYTE_IO)  # small pickles first
        total = planned_bytes(items) if not self._extensions else None  # a codec changes the size
        with upload_bar(self.progress_label) as progress, self.blobs.open_atomic(location) as sink:
            target = sink if progress is None else ReportingSink(sink, progress, total)
            results = _RankFileLayout(target, name, self._extensions).write(items, planner)
        self.written.append(ShardFact(rank=self.rank, location=location, bytes=sink.size, hash=sink.hash))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator: write DCP's ``.metadata`` (every item's file, offset, length, descriptors) last."""
        metadata.version = _CURRENT_DCP_VERSION
        metadata.storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
        metadata.storage_meta = self.storage_meta()
        location = f"{self.directory}/{DCP_METADATA_FILE}"
        with self.blobs.open_atomic(location) as sink:
            sink.write(pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL))
        self.written.append(ShardFact(rank=self.rank, location=location, bytes=sink.size, hash=sink.hash))

    def storage_meta(self) -> StorageMeta | None:
        """DCP's record of where the checkpoint was written."""
        return StorageMeta(checkpoint_id=self.directory)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:  # noqa: ANN401 - DCP's signature
        """Never chosen by DCP from a bare id: it is always passed explicitly."""
        return False


class _RankFileLayout:
    """Lays out one rank's items in its file: offsets recorded as the bytes are handed to the writer."""

    def __init__(self, sink: BlobWriter, name: str, extensions: list[Any]) -> None:
        self._sink = sink
        self._name = name
        self._extensions = extensions
        self._codec_descriptors = [ext.get_descriptor() for ext in reversed(extensions)]
        self._pending: list[memoryview] = []
        self._pending_bytes = 0
        self._offset = 0  # bytes handed to the writer so far, pending ones included

    def write(self, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        results = [self._write_item(item, planner.resolve_data(item)) for item in items]
        self._flush()
        return results

    def _write_item(self, item: WriteItem, data: Any) -> WriteResult:  # noqa: ANN401 - BytesIO or tensor
        if item.type == WriteItemType.BYTE_IO:
            payload, descriptors = data.getbuffer(), list(self._codec_descriptors)
        else:
            if data.device.type != "cpu":
                data = data.cpu()
            self._pad_to(ITEM_ALIGNMENT)
            payload = tensor_bytes(data)
            descriptors = [*self._codec_descriptors, RawTensorBytes.descriptor_for(data.dtype, data.shape)]
        offset = self._offset
        if self._extensions:
            self._encode(payload)
        else:
            self._append(payload)
        length = self._offset - offset
        return WriteResult(index=item.index, size_in_bytes=length,
                           storage_data=_StorageInfo(self._name, offset, length, transform_descriptors=descriptors))

    def _encode(self, payload: memoryview) -> None:
        """Through the run's codec: compressed pieces go straight to the writer."""
        self._flush()
        stream: Any = _SinkStream(self._sink)
        for ext in self._extensions:
            stream = ext.transform_to(stream)
        stream.write(payload)
        stream.close()
        self._offset = self._sink.size

    def _pad_to(self, alignment: int) -> None:
        gap = -self._offset % alignment
        if gap:
            self._append(memoryview(_ZEROS)[:gap])

    def _append(self, view: memoryview) -> None:
        self._pending.append(view)
        self._pending_bytes += len(view)
        self._offset += len(view)
        if self._pending_bytes >= _WRITE_BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._sink.writev(self._pending)
            self._pending, self._pending_bytes = [], 0


class _ItemBytes(io.BytesIO):
    """One stored item's bytes, named ``file@offset`` so a codec's error can say where it was."""

    def __init__(self, data: bytes, name: str, offset: int) -> None:
        super().__init__(data)
        self.name = name
        self.offset = offset


class LedgerStorageReader(StorageReader):
    """DCP reader for checkpoints in ``directory`` of ``blobs`` — the raw layout and DCP's own.

    It does not verify hashes: verify the recorded shards first (``BlobStore.verify``).
    """

    def __init__(self, blobs: BlobStore, directory: str, registry: ExtensionRegistry | None = None) -> None:
        super().__init__()
        self.blobs = blobs
        self.directory = directory.rstrip("/")
        self._registry = registry or reader_registry()
        self.storage_data: dict[MetadataIndex, _StorageInfo] = {}

    def reset(self, checkpoint_id: Any = None) -> None:  # noqa: ANN401 - DCP's signature
        """Forget the previous load's metadata."""
        self.storage_data = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's ``Metadata``, from the checkpoint's ``.metadata`` file."""
        location = f"{self.directory}/{DCP_METADATA_FILE}"
        with self.blobs.open_read(location) as fh:
            try:
                metadata = pickle.load(fh)
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
                raise CorruptBlobError(f"{location} is not a DCP metadata file ({err})", location=location,
                                       expected_hash=None, found_hash=None) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Keep where every item lives."""
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Nothing to add."""
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Nothing to add."""
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every requested item, file by file in offset order."""
        per_file: dict[str, list[ReadItem]] = {}
        for request in plan.items:
            per_file.setdefault(self.storage_data[request.storage_index].relative_path, []).append(request)
        for name, requests in per_file.items():
            location = f"{self.directory}/{name}"
            requests.sort(key=lambda r: self.storage_data[r.storage_index].offset)
            with self.blobs.open_read(location) as fh:
                for request in requests:
                    self._read_item(fh, location, request, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_item(self, fh: BinaryIO, location: str, request: ReadItem, planner: LoadPlanner) -> None:
        info = self.storage_data[request.storage_index]
        descriptors = list(info.transform_descriptors or ())
        layout = None
        if descriptors and descriptors[-1].startswith(f"{RawTensorBytes.registry_name()}/"):
            layout = RawTensorBytes.from_descriptor(descriptors.pop().partition("/")[2])
        if request.type == LoadItemType.BYTE_IO:
            planner.load_bytes(request, io.BytesIO(self._decoded(fh, location, info, descriptors)))
            return
        target = planner.resolve_tensor(request).detach()
        if layout is None:  # DCP's own format: a torch.save container per item
            stored = torch.load(io.BytesIO(self._decoded(fh, location, info, descriptors)), map_location="cpu",
                                weights_only=True)
        elif not descriptors and _whole(request, layout) and _fits(target, layout):
            fh.seek(info.offset)
            _read_exactly(fh, tensor_bytes_writable(target), location)  # straight into the destination
            planner.commit_tensor(request, target)
            return
        else:
            data = bytearray(self._decoded(fh, location, info, descriptors))
            if len(data) != layout.nbytes:
                raise CorruptBlobError(f"checkpoint item {location}@{info.offset} has {len(data)} bytes, its "
                                       f"layout needs {layout.nbytes}; the file is damaged", location=location,
                                       expected_hash=None, found_hash=None)
            stored = (torch.frombuffer(data, dtype=torch.uint8).view(layout.dtype).reshape(layout.shape) if data
                      else torch.empty(layout.shape, dtype=layout.dtype))
        piece = stored
        for dim, (start, length) in enumerate(zip(request.storage_offsets, request.lengths)):
            piece = piece.narrow(dim, start, length)  # this rank's part of the stored chunk
        if piece.size() != target.size():
            raise CorruptBlobError(f"checkpoint item {request.storage_index.fqn} in {location} has shape "
                                   f"{tuple(piece.size())}, the plan expects {tuple(target.size())}",
                                   location=location, expected_hash=None, found_hash=None)
        target.copy_(piece)
        planner.commit_tensor(request, target)

    def _decoded(self, fh: BinaryIO, location: str, info: _StorageInfo, descriptors: list[str]) -> bytes:
        """An item's stored bytes, decoded by the codecs its descriptors name."""
        fh.seek(info.offset)
        data = bytearray(info.length)
        _read_exactly(fh, memoryview(data), location)
        if not descriptors:
            return bytes(data)
        stream: Any = _ItemBytes(bytes(data), location, info.offset)
        for ext in self._registry.from_descriptor_list(descriptors):
            stream = ext.transform_from(stream)
        return stream.read(-1)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:  # noqa: ANN401 - DCP's signature
        """Never chosen by DCP from a bare id: it is always passed explicitly."""
        return False


def tensor_bytes_writable(tensor: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (for ``readinto``)."""
    if tensor.numel() == 0:
        return memoryview(bytearray())
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _whole(request: ReadItem, layout: RawTensorBytes) -> bool:
    """Whether the request reads the entire stored tensor (no resharding slice of it)."""
    return all(o == 0 for o in request.storage_offsets) and tuple(request.lengths) == layout.shape


def _fits(target: torch.Tensor, layout: RawTensorBytes) -> bool:
    """Whether the stored bytes can land in ``target``'s memory as they are."""
    return (target.device.type == "cpu" and target.dtype == layout.dtype and target.is_contiguous()
            and tuple(target.shape) == layout.shape)


def _read_exactly(fh: BinaryIO, view: memoryview, location: str) -> None:
    """Fill ``view`` from ``fh``; a file that ends first is damaged."""
    filled = 0
    while filled < len(view):
        count = fh.readinto(view[filled:])
        if not count:
            raise CorruptBlobError(f"shard {location} ends {len(view) - filled} bytes early (truncated)",
                                   location=location, expected_hash=None, found_hash=None)
        filled += count
