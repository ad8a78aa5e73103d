"""Offline export: a consolidated, model-only state dict from a committed checkpoint's DCP files.

No process group is needed: the global shape of every model tensor is in DCP's
metadata, so full tensors are allocated and DCP fills them from however many shards
wrote them (``no_dist=True``). Every shard's hash is verified against the ledger
first. The run directory is only read; the result is written to ``out`` atomically.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ledger import BlobStore, CorruptBlobError, Ledger, LocalBlobStore
from trainer.checkpoint_candidates import Candidate
from trainer.checkpoint_storage import LedgerStorageReader
from trainer.errors import TrainerError
from trainer.pretrained import plain_key
from trainer.train_state import SafeLoadPlanner

FORMATS = ("torch", "safetensors")
_MODEL_PREFIX = "model."


class ExportRefusedError(TrainerError):
    """The checkpoint exists but cannot be exported (not committed, deleted, or a shard is corrupt)."""


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What was exported."""

    checkpoint_id: str
    step: int
    tensors: int
    bytes: int
    out: Path


def consolidated_model_state(directory: str | os.PathLike[str], blobs: BlobStore | None = None) -> dict[str, torch.Tensor]:
    """Every ``model.*`` tensor of a DCP checkpoint directory as one full tensor, keyed by plain name.

    ``directory`` is a location in ``blobs``, or without ``blobs`` a local directory. Reads
    both layouts: ckpt-ledger's raw one and DCP's own ``torch.save`` items.
    """
    if blobs is None:
        blobs, directory = LocalBlobStore(directory), "."
    reader = LedgerStorageReader(blobs, str(directory))
    metadata = reader.read_metadata()
    template = {
        fqn[len(_MODEL_PREFIX):]: torch.empty(md.size, dtype=md.properties.dtype)
        for fqn, md in metadata.state_dict_metadata.items()
        if fqn.startswith(_MODEL_PREFIX) and isinstance(md, TensorStorageMetadata)
    }
    if not template:
        raise ExportRefusedError(f"{directory} holds no model tensors")
    state = {"model": template}
    with warnings.catch_warnings():
        # no_dist=True is the point here; DCP warns that it found no process group.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, storage_reader=LedgerStorageReader(blobs, str(directory)), no_dist=True,
                 planner=SafeLoadPlanner())  # never runs pickled code
    return {plain_key(k): v for k, v in state["model"].items()}


def export_model(run_dir: str | os.PathLike[str], ref: str, out: str | os.PathLike[str], *,
                 fmt: str = "torch", progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Verify and consolidate checkpoint ``ref`` (``latest``, ``best`` or an id) of a run into ``out``.

    The shards are read from wherever the run keeps them (``run.started.blobs``).
    ``progress(done, total)`` is called with the bytes verified so far.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    ledger = Ledger.open(run_dir, read_only=True)
    ckpt = ledger.projection().checkpoint(ref)  # CheckpointNotFoundError for an unknown id or alias
    if not ckpt.usable:
        raise ExportRefusedError(f"checkpoint {ckpt.checkpoint_id} (step {ckpt.step}) is {ckpt.status}"
                                 f"{' and being deleted' if ckpt.deletion_requested else ''}; export a committed one")
    candidate = Candidate.of(ckpt)
    total, done = sum(s.bytes for s in candidate.shards), 0
    for shard in candidate.shards:
        try:
            ledger.blobs.verify(shard.location, shard.hash, shard.bytes,
                                progress=None if progress is None else lambda n, base=done: progress(base + n, total))
        except CorruptBlobError as err:
            raise ExportRefusedError(f"checkpoint {ckpt.checkpoint_id}: {err}; export refused") from None
        done += shard.bytes
    try:
        directory = candidate.directory()
    except CorruptBlobError as err:
        raise ExportRefusedError(str(err)) from None
    state = consolidated_model_state(directory, ledger.blobs)

    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                      metadata={"checkpoint_id": ckpt.checkpoint_id, "step": str(ckpt.step)})
        else:
            torch.save(state, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(ckpt.checkpoint_id, ckpt.step, len(state), target.stat().st_size, target)
