"""Committed checkpoints as load candidates: verify every shard's hash first, then read them back.

Verification is collective: each rank hashes a share of the shards (preferring the
files it wrote itself, which are the ones it will read when the layout is unchanged)
and every rank sees every finding, so all agree whether a candidate is usable. A shard
that is missing or hashes differently is never loaded. Local files are hashed through a
read-only mapping of the page cache (no copy); from other stores, the bytes of the files
a rank verified are kept until :func:`load_candidate` reads that same candidate (or the
next verification), so a verified load downloads each file once.
"""

from __future__ import annotations

import io
import mmap
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ledger import BlobStore, CorruptBlobError
from ledger.blobs import format_hash, hash_algo_of, new_hasher
from ledger.projection import CheckpointState
from trainer.checkpoint_storage import DCP_METADATA_FILE, LedgerStorageReader
from trainer.run_recorder import ShardFact
from trainer.process_group import DistContext
from trainer.train_state import SafeLoadPlanner

#: Bytes read (and hashed) at a time when verifying.
_READ_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class Candidate:
    """A committed checkpoint as the ledger describes it, enough to verify and load it."""

    checkpoint_id: str
    step: int
    epoch: int
    world_size: int
    stack: str
    topology: dict[str, int]
    shards: tuple[ShardFact, ...]

    @classmethod
    def of(cls, ckpt: CheckpointState) -> "Candidate":
        """The candidate for a checkpoint of the projection."""
        return cls(
            checkpoint_id=ckpt.checkpoint_id, step=ckpt.step, epoch=ckpt.epoch, world_size=ckpt.world_size,
            stack=ckpt.stack, topology=dict(ckpt.topology),
            shards=tuple(ShardFact(s.rank, s.location, s.bytes, s.hash, s.codec) for s in ckpt.shards),
        )

    def directory(self) -> str:
        """The DCP directory: where the recorded ``.metadata`` shard lives."""
        for shard in self.shards:
            if shard.location.rsplit("/", 1)[-1] == DCP_METADATA_FILE:
                return shard.location.rsplit("/", 1)[0]
        raise CorruptBlobError(
            f"checkpoint {self.checkpoint_id} has no recorded {DCP_METADATA_FILE} shard; it cannot be read",
            location=f"{self.checkpoint_id}/{DCP_METADATA_FILE}", expected_hash=None, found_hash=None,
        )


@dataclass(frozen=True, slots=True)
class BadShard:
    """A shard that failed verification."""

    checkpoint_id: str
    location: str
    expected_hash: str
    found_hash: str | None
    detail: str


class VerifiedFiles:
    """The bytes of the shards this rank verified last, by location (kept for the load that follows)."""

    def __init__(self) -> None:
        self.checkpoint_id: str | None = None
        self.files: dict[str, memoryview] = {}

    def clear(self) -> None:
        """Let the bytes go."""
        self.checkpoint_id, self.files = None, {}


def verify_candidate(ctx: DistContext, blobs: BlobStore, candidate: Candidate, keep: VerifiedFiles) -> list[BadShard]:
    """Every shard of ``candidate`` that is missing or does not hash as recorded (collective)."""
    keep.clear()
    bad: list[BadShard] = []
    mine, others = _my_share(candidate.shards, ctx.rank, ctx.world_size)
    for shard in mine + others:
        try:
            data = read_verified(blobs, shard)
            # Bytes that were downloaded are kept for the load (what this rank will read); a mapped
            # local file is not: the kernel copies it into the tensors faster than a copy from the map.
            if not isinstance(data.obj, mmap.mmap) and (
                    shard in mine or shard.location.endswith(f"/{DCP_METADATA_FILE}")):
                keep.files[shard.location] = data
        except CorruptBlobError as err:
            bad.append(BadShard(candidate.checkpoint_id, shard.location, shard.hash, err.found_hash, str(err)))
    everyone: list[list[BadShard]] = [[] for _ in range(ctx.world_size)]
    dist.all_gather_object(everyone, bad)
    found = sorted((b for found in everyone for b in found), key=lambda b: b.location)
    if found:
        keep.clear()
    else:
        keep.checkpoint_id = candidate.checkpoint_id
    return found


def load_candidate(blobs: BlobStore, candidate: Candidate, template: dict[str, Any], kept: VerifiedFiles) -> None:
    """Read a verified checkpoint into ``template`` in place (collective); files kept by verification are reused."""
    files = kept.files if kept.checkpoint_id == candidate.checkpoint_id else {}
    try:
        # SafeLoadPlanner: non-tensor items load with weights_only=True, so loading never runs pickled code.
        dcp.load(template, storage_reader=LedgerStorageReader(_KeptFirst(blobs, files), candidate.directory()),
                 planner=SafeLoadPlanner())
    finally:
        kept.clear()


def read_verified(blobs: BlobStore, shard: ShardFact) -> memoryview:
    """A shard's bytes, hashed as read; :class:`CorruptBlobError` unless they are what the ledger recorded.

    A local file is mapped rather than copied (what the page cache holds is hashed in
    place); other stores are read into one buffer.
    """
    location, expected = shard.location, shard.hash
    try:
        algo = hash_algo_of(expected)
    except ValueError as err:
        raise CorruptBlobError(f"shard {location}: {err}", location=location, expected_hash=expected,
                               found_hash=None) from None
    try:
        data = blobs.map_read(location)
        if data is None:
            data = _read_whole(blobs, location)
    except CorruptBlobError as err:  # missing
        raise CorruptBlobError(str(err), location=location, expected_hash=expected, found_hash=None) from None
    hasher = new_hasher(algo)
    for start in range(0, len(data), _READ_BYTES):
        hasher.update(data[start:start + _READ_BYTES])  # xxhash releases the GIL
    found = format_hash(hasher, algo)
    if len(data) != shard.bytes:
        raise CorruptBlobError(f"shard {location} has {len(data)} bytes, the ledger recorded {shard.bytes}",
                               location=location, expected_hash=expected, found_hash=found)
    if found != expected:
        raise CorruptBlobError(f"shard {location} hash {found} does not match the ledger's {expected}",
                               location=location, expected_hash=expected, found_hash=found)
    return data


def _read_whole(blobs: BlobStore, location: str) -> memoryview:
    """Every stored byte of ``location`` in one buffer, read through ``open_read``."""
    size = blobs.size(location)
    if size is None:
        raise CorruptBlobError(f"shard {location} is missing", location=location, expected_hash=None, found_hash=None)
    view = memoryview(torch.empty(size, dtype=torch.uint8).numpy()).cast("B") if size else memoryview(bytearray())
    filled = 0
    with blobs.open_read(location) as fh:
        while filled < size and (count := fh.readinto(view[filled:filled + _READ_BYTES])):
            filled += count
        extra = fh.read(1 << 20)
    if extra:  # it grew since size(): hash what is there, the size check refuses it
        return memoryview(bytes(view[:filled]) + extra)
    return view[:filled]


def _my_share(shards: tuple[ShardFact, ...], rank: int, world_size: int) -> tuple[list[ShardFact], list[ShardFact]]:
    """The shards this rank verifies: the data files of the ranks it stands in for, a round-robin share of the rest."""
    mine, rest = [], []
    for shard in shards:
        if shard.location.endswith(f"/__{shard.rank}_0.distcp"):
            (mine if shard.rank % world_size == rank else []).append(shard)
        else:
            rest.append(shard)
    return mine, [s for i, s in enumerate(sorted(rest, key=lambda s: s.location)) if i % world_size == rank]


class _KeptFirst(BlobStore):
    """A read-only view of ``blobs`` that serves the files verification kept from memory."""

    def __init__(self, blobs: BlobStore, kept: dict[str, memoryview]) -> None:
        self._blobs = blobs
        self._kept = kept

    def open_read(self, location: str) -> BinaryIO:
        data = self._kept.get(location)
        if data is None:
            return self._blobs.open_read(location)
        return _BufferFile(data)

    def size(self, location: str) -> int | None:
        return self._blobs.size(location)

    def exists(self, location: str) -> bool:
        return self._blobs.exists(location)

    def open_atomic(self, location: str):  # noqa: ANN201 - never used: this view only reads
        raise PermissionError("a verified view of the blob store is read-only")

    def delete(self, location: str) -> None:
        raise PermissionError("a verified view of the blob store is read-only")

    def list_files(self):  # noqa: ANN201
        return self._blobs.list_files()


class _BufferFile(io.RawIOBase):
    """A seekable read-only file over a buffer (no copy)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:  # noqa: ANN401 - any writable buffer
        out = memoryview(b).cast("B")
        count = max(0, min(len(out), len(self._view) - self._pos))
        out[:count] = self._view[self._pos:self._pos + count]
        self._pos += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos
