"""Checkpoint codecs for DCP files: how each item's bytes are stored, chosen per training run.

``torch.distributed.checkpoint`` (DCP) writes every item of a rank's state as one stream
inside the rank's ``.distcp`` file, and lets *stream-transform extensions* re-encode
each stream (``FileSystemWriter(_extensions=...)``). Each extension names itself with a
descriptor string; DCP stores the descriptors per item in ``.metadata`` and, on load,
rebuilds the decoders from them through an ``ExtensionRegistry``
(``FileSystemReader(_extension_registry=...)``). So one reader serves every codec, and a
checkpoint written without extensions (no descriptors) loads as before.

Codecs (the names of ``ledger.shard_codecs.CODECS``):

* ``none``    — no extension: DCP's plain format.
* ``zstd``    — one zstd frame per item, descriptor ``stream.zstd/1``: the same format as
  DCP's built-in ``ZStandard`` extension (which can read it), but written *with* a frame
  checksum — without one, zstd lets almost every flipped bit through as wrong bytes.
* ``zstd-bg`` — byte-grouped zstd (:class:`ByteGroupedZstd`): the item's bytes are cut
  into fixed-size chunks, each chunk is byte-grouped (``ledger.shard_codecs.group_bytes``: byte
  0 of every element, then byte 1, ...) and all chunks go through one checksummed zstd
  frame. Float exponent bytes are near-constant once grouped, so this compresses trained
  fp32/bf16 weights noticeably better than ``zstd``.

What the transform sees: with the trainer's writer (``trainer.checkpoint_storage``), a
tensor item's raw bytes (C order, no container; the item is marked
``raw-tensor@ckpt-ledger/1;dtype=..;shape=..`` by :class:`RawTensorBytes`, listed after the
codec's descriptor), and for a ``BYTE_IO`` item the bytes the save planner made of the
object (the default planner: a small ``torch.save`` zip container). With DCP's own
``FileSystemWriter`` (torch 2.13, ``SerializationFormat.TORCH_SAVE``), a tensor item is the
``torch.save`` zip container of that one tensor — pickle first, then the raw storage as
one record whose data starts at an offset aligned to 64 bytes from the start of the
stream (``torch.utils.serialization.config.save.storage_alignment``; a test checks it).
Either way the storage bytes start at a multiple of 64 bytes into the item.

Element width: ``transform_to`` is handed only the output stream, never the
``WriteItem``, so an item's dtype is *not* reachable from an extension, and its
descriptor is taken before the first byte is written. ``zstd-bg`` therefore groups every
item with one fixed width, :data:`GROUP_WIDTH` = 4 bytes, recorded in the descriptor. 4 is
a multiple of every 1-, 2- and 4-byte element, so fp32, bf16, fp16 and int32 each get
groups holding a single byte position: on 64 MB of ``randn * 0.02`` in bf16, width 4 and
width 2 both store 0.6845 of the raw size (plain zstd: 0.780). 8-byte dtypes would gain
from width 8, but int64 counters and fp64 are a sliver of a training checkpoint. Chunks
start at multiples of the chunk size from the start of the stream and the chunk size is
a multiple of the width, so groups line up with element boundaries wherever the storage
record does. The zip headers and pickle of an item are grouped too, which costs about
230 bytes per item against plain zstd (measured on 64-element fp32 tensors); it only
shows on tiny tensors.
"""

from __future__ import annotations

import io
import math
from typing import IO, Sequence

import torch
import zstandard
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension

from ledger.shard_codecs import group_bytes, ungroup_bytes
from ledger.errors import CorruptBlobError, SchemaTooNewError

#: The codecs a run may choose for its DCP files.
CHECKPOINT_CODECS = ("none", "zstd", "zstd-bg")

#: Element width (bytes) ``zstd-bg`` groups by: see the module docstring for why it is fixed.
GROUP_WIDTH = 4
#: Bytes grouped at a time by ``zstd-bg``; the writer holds about two chunks, never a whole item.
GROUP_CHUNK_BYTES = 4 << 20
#: zstd level of both codecs. On fp32/bf16 weights level 1 stores as small as level 3 (byte-grouped:
#: smaller) at 2-3x the speed; the level is the writer's choice, readers do not need it.
ZSTD_LEVEL = 1
_MAX_WIDTH = 16
_READ_BYTES = 1 << 20


def writer_extensions(codec: str) -> list[StreamTransformExtension]:
    """The extensions for ``FileSystemWriter(_extensions=...)`` that store items with ``codec``.

    ``codec`` is one of :data:`CHECKPOINT_CODECS`; ``none`` gives ``[]`` (DCP's plain format).
    Each call returns new instances. Raises ``ValueError`` for any other name.
    """
    if codec == "none":
        return []
    if codec == "zstd":
        return [ChecksummedZstd()]
    if codec == "zstd-bg":
        return [ByteGroupedZstd()]
    raise ValueError(f"unknown checkpoint codec {codec!r}; use one of {', '.join(CHECKPOINT_CODECS)}")


def reader_registry() -> ExtensionRegistry:
    """An ``ExtensionRegistry`` for ``FileSystemReader(_extension_registry=...)`` that reads every codec.

    Decoders are picked per item from the descriptors in ``.metadata``: items without
    descriptors (``none``, or checkpoints from before codecs) are read as they are, and
    ``stream.zstd/1`` items written by DCP's own ``ZStandard`` extension are read too.
    """
    registry = ExtensionRegistry()
    registry.register(ChecksummedZstd)  # replaces DCP's reader for "stream.zstd": ours reports truncation
    registry.register(ByteGroupedZstd)
    registry.register(RawTensorBytes)
    return registry


class RawTensorBytes(StreamTransformExtension):
    """Marks a tensor item stored as its raw bytes (``trainer.checkpoint_storage``'s layout).

    Descriptor ``raw-tensor@ckpt-ledger/1;dtype=D;shape=A,B,...``: the item (after any
    codec listed before it is decoded) is the C-order bytes of a tensor of dtype ``D``
    and shape ``A x B x ...`` — no ``torch.save`` container. Our reader
    (``LedgerStorageReader``) reads such items straight into the destination tensor;
    for DCP's own ``FileSystemReader`` given :func:`reader_registry`, :meth:`transform_from`
    wraps the bytes in the ``torch.save`` container that reader expects (a copy, so it
    is the slow path). A reader without this registry refuses the item by name.
    """

    def __init__(self, dtype: torch.dtype = torch.uint8, shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.dtype = dtype
        self.shape = tuple(shape)

    @staticmethod
    def registry_name() -> str:
        """``raw-tensor@ckpt-ledger``: a local-domain name, so it can never clash with DCP's."""
        return "raw-tensor@ckpt-ledger"

    @staticmethod
    def from_descriptor(version: str) -> RawTensorBytes:
        """The layout of a stored ``raw-tensor@ckpt-ledger/<version>`` item."""
        descriptor = f"{RawTensorBytes.registry_name()}/{version}"
        major, *pairs = version.split(";")
        _check_major(descriptor, major)
        params = dict(pair.partition("=")[::2] for pair in pairs)
        dtype = getattr(torch, params.get("dtype", ""), None)
        try:
            shape = tuple(int(n) for n in params["shape"].split(",") if n)
        except (KeyError, ValueError):
            shape = None
        if not isinstance(dtype, torch.dtype) or shape is None or any(n < 0 for n in shape):
            raise _bad_descriptor(descriptor, "no valid dtype and shape")
        return RawTensorBytes(dtype, shape)

    @classmethod
    def descriptor_for(cls, dtype: torch.dtype, shape: Sequence[int]) -> str:
        """The descriptor of an item holding the raw bytes of a ``dtype`` tensor of ``shape``."""
        return f"{cls.registry_name()}/1;dtype={str(dtype).removeprefix('torch.')};shape={','.join(map(str, shape))}"

    def get_descriptor(self) -> str:
        """``raw-tensor@ckpt-ledger/1;dtype=D;shape=...``."""
        return self.descriptor_for(self.dtype, self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the raw item in bytes."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        """Raw bytes are written as they are: the storage writer writes them itself."""
        return output

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:  # noqa: A002 - DCP's parameter name
        """The item as the ``torch.save`` container DCP's ``FileSystemReader`` loads (a copy)."""
        data = bytearray(input.read(-1))
        if len(data) != self.nbytes:
            where = _describe(input)
            raise CorruptBlobError(
                f"checkpoint item {where} has {len(data)} bytes, its layout needs {self.nbytes}; the file is damaged",
                location=where, expected_hash=None, found_hash=None)
        tensor = torch.frombuffer(data, dtype=torch.uint8).view(self.dtype).reshape(self.shape) if data else \
            torch.empty(self.shape, dtype=self.dtype)
        container = io.BytesIO()
        torch.save(tensor, container)
        container.seek(0)
        return container


class ChecksummedZstd(StreamTransformExtension):
    """Codec ``zstd``: each item as one zstd frame with a content checksum (descriptor ``stream.zstd/1``)."""

    @staticmethod
    def registry_name() -> str:
        """DCP's name for zstd streams, so DCP's built-in reader can read ours and ours DCP's."""
        return "stream.zstd"

    @staticmethod
    def from_descriptor(version: str) -> ChecksummedZstd:
        """The decoder for a stored ``stream.zstd/<version>`` item (major version 1 only)."""
        _check_major(f"{ChecksummedZstd.registry_name()}/{version}", version.partition(".")[0])
        return ChecksummedZstd()

    def get_descriptor(self) -> str:
        """``stream.zstd/1``, as DCP's own extension writes it."""
        return f"{self.registry_name()}/1"

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        """A stream compressing what is written to it into ``output``; closing it ends the frame."""
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
        return compressor.stream_writer(output)  # closing it closes ``output``, as DCP expects

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:  # noqa: A002 - DCP's parameter name
        """A stream of the decompressed item; raises :class:`CorruptBlobError` if the frame is damaged."""
        return _FrameReader(input, width=1, chunk_bytes=GROUP_CHUNK_BYTES, codec="zstd")


class ByteGroupedZstd(StreamTransformExtension):
    """Codec ``zstd-bg``: each item byte-grouped chunk by chunk, then one checksummed zstd frame.

    The descriptor, ``stream.zstd-bg@ckpt-ledger/1;width=W;chunk=C``, holds everything a
    reader needs besides the frame: format version 1, the group width ``W`` and the chunk
    size ``C`` (a multiple of ``W``). The decoded stream is ``ungroup_bytes`` of each
    ``C``-byte piece of the decompressed frame (the last piece may be shorter). Keys a
    version-1 reader does not know are ignored; anything that changes decoding bumps the
    version.

    Memory: the writer holds at most one partial chunk plus one grouped chunk (and zstd's
    window), whatever the item's size. The reader decodes a chunk at a time, but DCP
    itself reads a tensor item whole before ``torch.load`` (it needs a seekable stream),
    so loading buffers one decoded item either way. zstd and numpy's copies release the
    GIL, so encoding on a background thread does not stall training.
    """

    def __init__(self, width: int = GROUP_WIDTH, chunk_bytes: int = GROUP_CHUNK_BYTES) -> None:
        super().__init__()
        _check_layout(width, chunk_bytes)
        self.width = width
        self.chunk_bytes = chunk_bytes

    @staticmethod
    def registry_name() -> str:
        """``stream.zstd-bg@ckpt-ledger``: a local-domain name, so it can never clash with DCP's."""
        return "stream.zstd-bg@ckpt-ledger"

    @staticmethod
    def from_descriptor(version: str) -> ByteGroupedZstd:
        """The decoder for a stored ``stream.zstd-bg@ckpt-ledger/<version>`` item."""
        descriptor = f"{ByteGroupedZstd.registry_name()}/{version}"
        major, *pairs = version.split(";")
        _check_major(descriptor, major)
        params: dict[str, str] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise _bad_descriptor(descriptor, f"{pair!r} is not key=value")
            params[key] = value
        try:
            width, chunk_bytes = int(params["width"]), int(params["chunk"])
            _check_layout(width, chunk_bytes)
        except (KeyError, ValueError) as err:
            raise _bad_descriptor(descriptor, f"no valid width and chunk ({err})") from err
        return ByteGroupedZstd(width, chunk_bytes)

    def get_descriptor(self) -> str:
        """``stream.zstd-bg@ckpt-ledger/1;width=W;chunk=C``."""
        return f"{self.registry_name()}/1;width={self.width};chunk={self.chunk_bytes}"

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        """A stream grouping and compressing what is written to it into ``output``; closing it ends the frame."""
        return _GroupingWriter(output, self.width, self.chunk_bytes)

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:  # noqa: A002 - DCP's parameter name
        """A stream of the decoded item; raises :class:`CorruptBlobError` if the frame is damaged."""
        return _FrameReader(input, width=self.width, chunk_bytes=self.chunk_bytes, codec="zstd-bg")


class _GroupingWriter(io.RawIOBase):
    """Cuts what is written into ``chunk_bytes`` pieces at stream offsets k * chunk_bytes and
    writes each piece, byte-grouped, into one checksummed zstd frame on ``output``."""

    def __init__(self, output: IO[bytes], width: int, chunk_bytes: int) -> None:
        super().__init__()
        self._width = width
        self._chunk_bytes = chunk_bytes
        self._pending = bytearray()  # the start of the current chunk (shorter than a chunk)
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
        self._frame = compressor.stream_writer(output)  # closing it closes ``output``

    def writable(self) -> bool:
        """Always: this is an output stream."""
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:
        """Take ``b`` whole; full chunks are grouped and compressed now, the rest waits for more."""
        view = memoryview(b).cast("B")
        size, start = len(view), 0
        if self._pending:
            start = min(size, self._chunk_bytes - len(self._pending))
            self._pending += view[:start]
            if len(self._pending) < self._chunk_bytes:
                return size
            self._frame.write(group_bytes(self._pending, self._width))
            self._pending.clear()
        while size - start >= self._chunk_bytes:  # whole chunks straight from the caller's buffer
            self._frame.write(group_bytes(view[start : start + self._chunk_bytes], self._width))
            start += self._chunk_bytes
        self._pending += view[start:]
        return size

    def close(self) -> None:
        """Group and compress the last, short chunk, end the zstd frame and close ``output``."""
        if self.closed:
            return
        try:
            if self._pending:
                self._frame.write(group_bytes(self._pending, self._width))
                self._pending = bytearray()
            self._frame.close()
        finally:
            super().close()


class _FrameReader(io.RawIOBase):
    """Reads one zstd frame from ``input`` and yields ``ungroup_bytes`` of each ``chunk_bytes`` piece.

    Unlike a plain zstd stream reader, a frame that stops early, or bytes after the frame,
    are errors, not a silently shorter item.
    """

    def __init__(self, input: IO[bytes], *, width: int, chunk_bytes: int, codec: str) -> None:  # noqa: A002
        super().__init__()
        self._input = input
        self._width = width
        self._chunk_bytes = chunk_bytes
        self._codec = codec
        self._decompressor = zstandard.ZstdDecompressor().decompressobj()
        self._grouped = bytearray()  # decompressed, not yet ungrouped
        self._ready = memoryview(b"")  # ungrouped, not yet returned
        self._input_done = False

    def readable(self) -> bool:
        """Always: this is an input stream."""
        return True

    def readinto(self, b: bytearray | memoryview) -> int:
        """Fill ``b`` from the decoded item; 0 at its end."""
        out = memoryview(b).cast("B")
        if not self._ready:
            self._ready = memoryview(self._next_chunk())
        count = min(len(out), len(self._ready))
        out[:count] = self._ready[:count]
        self._ready = self._ready[count:]
        return count

    def readall(self) -> bytes:
        """The rest of the decoded item (what DCP asks for: it reads each item whole)."""
        parts = [bytes(self._ready)]
        self._ready = memoryview(b"")
        while chunk := self._next_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def _next_chunk(self) -> bytes | bytearray:
        """The next ungrouped chunk, or ``b""`` at the end of a complete frame."""
        while len(self._grouped) < self._chunk_bytes and not self._input_done:
            data = self._input.read(_READ_BYTES)
            if not data:
                self._finish_frame()
                break
            if self._decompressor.eof:
                raise self._corrupt(f"has {len(data)}+ bytes after the end of its zstd frame")
            try:
                self._grouped += self._decompressor.decompress(data)
            except zstandard.ZstdError as err:
                raise self._corrupt(f"is not a valid {self._codec} stream ({err})") from err
        piece = self._grouped[: self._chunk_bytes]
        del self._grouped[: self._chunk_bytes]
        return ungroup_bytes(piece, self._width) if piece else b""

    def _finish_frame(self) -> None:
        self._input_done = True
        if not self._decompressor.eof:
            raise self._corrupt(f"ends inside its zstd frame (truncated {self._codec} stream)")
        if self._decompressor.unused_data:
            raise self._corrupt(f"has {len(self._decompressor.unused_data)} bytes after the end of its zstd frame")

    def _corrupt(self, what: str) -> CorruptBlobError:
        where = _describe(self._input)
        return CorruptBlobError(
            f"checkpoint item {where} {what}; the file is damaged, load an earlier checkpoint",
            location=where, expected_hash=None, found_hash=None,
        )


def _describe(stream: IO[bytes]) -> str:
    """``FILE@OFFSET`` for DCP's view of an item inside a ``.distcp`` file, as far as it can tell."""
    base = getattr(stream, "base_stream", stream)  # DCP's file view keeps the open file here
    name = getattr(base, "name", None)
    offset = getattr(stream, "offset", None)
    if name is None:
        return "<stream>"
    return f"{name}@{offset}" if offset is not None else str(name)


def _check_layout(width: int, chunk_bytes: int) -> None:
    if not 1 <= width <= _MAX_WIDTH:
        raise ValueError(f"group width must be 1..{_MAX_WIDTH} bytes, got {width}")
    if chunk_bytes <= 0 or chunk_bytes % width:
        raise ValueError(f"chunk size must be a positive multiple of the width {width}, got {chunk_bytes}")


def _check_major(descriptor: str, major: str) -> None:
    if major == "1":
        return
    if major.isdigit() and int(major) > 1:
        raise SchemaTooNewError(
            f"checkpoint item uses {descriptor!r}, this ckpt-ledger reads version 1; upgrade ckpt-ledger"
        )
    raise _bad_descriptor(descriptor, f"unknown version {major!r}")


def _bad_descriptor(descriptor: str, what: str) -> CorruptBlobError:
    return CorruptBlobError(
        f"checkpoint .metadata names the codec {descriptor!r}: {what}",
        location=".metadata", expected_hash=None, found_hash=None,
    )
