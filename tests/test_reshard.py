"""Resuming a checkpoint under another world size or stack: DCP reshards, the ledger records both layouts.

Each test resumes a real run (``Trainer`` on gloo ranks) and compares what the new
attempt loaded with the checkpoint's own files read offline: the model weights
exactly, and the optimizer state too where the loading stack can consolidate it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from distributed_ranks import run_ranks, run_trainer
from ledger import Ledger
from trainer.checkpointing import Candidate
from trainer.dcp_codec import reader_registry
from trainer.default_job import JobSpec
from trainer.export import consolidated_model_state

pytestmark = pytest.mark.multiprocess

#: A small job: 4 ranks of it fit on 2 busy cores.
SPEC = JobSpec(vocab=32, dim=32, heads=4, layers=4, hidden=64, seq_len=16, batch_size=8, eval_batches=1)
RANK_TIMEOUT = 150


def train(run_dir: Path, *, stack: str, nproc: int, steps: int, tp: int = 1, pp: int = 1, out: Path) -> dict:
    """One attempt of ``steps`` total steps; returns what rank 0 loaded at start."""
    config = {"run_dir": str(run_dir), "stack": stack, "tp": tp, "pp": pp, "steps": steps, "ckpt_every": 2,
              "eval_every": 2, "log_every": 1, "print_every": 0, "warmup_steps": 1, "seed": 3, "job": SPEC.as_dict(),
              "dist_timeout_s": 60.0}
    return run_trainer(config, nproc, out=out, timeout=RANK_TIMEOUT)


def checkpoint_dir(run_dir: Path, checkpoint_id: str) -> Path:
    ledger = Ledger.open(run_dir, read_only=True)
    return ledger.blobs.path(Candidate.of(ledger.projection().checkpoint(checkpoint_id)).directory())


def saved_optimizer_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every ``optim.state.*`` tensor of a DCP checkpoint, consolidated offline (keys ``fqn.name``)."""
    # DCP's own reader, given our extension registry, reads the raw layout too.
    metadata = FileSystemReader(directory, _extension_registry=reader_registry()).read_metadata()
    prefix = "optim.state."
    template = {key: torch.empty(md.size, dtype=md.properties.dtype)
                for key, md in metadata.state_dict_metadata.items()
                if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(template, storage_reader=FileSystemReader(directory, _extension_registry=reader_registry()),
                 no_dist=True)
    return {key[len(prefix):]: value for key, value in template.items()}


def assert_resumed(run_dir: Path, loaded: dict, *, from_checkpoint: str, saved_by: dict, now: dict,
                   steps: int, check_optimizer: bool) -> None:
    """The attempt loaded exactly the checkpoint's state, recorded both layouts and trained on to ``steps``."""
    directory = checkpoint_dir(run_dir, from_checkpoint)
    saved = consolidated_model_state(directory)
    assert loaded["start_step"] == Ledger.open(run_dir, read_only=True).projection().checkpoint(from_checkpoint).step
    assert sorted(loaded["weights"]) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(loaded["weights"][key], value), key
    if check_optimizer:
        saved_optim = saved_optimizer_state(directory)
        assert sorted(loaded["optim"]) == sorted(saved_optim)
        for key, value in saved_optim.items():
            assert torch.equal(loaded["optim"][key].reshape(value.shape), value), key

    view = Ledger.open(run_dir, read_only=True).projection()
    attempt = view.attempts[-1]
    assert attempt.resumed_from == from_checkpoint
    assert attempt.previous_topology == saved_by
    assert {"world_size": attempt.world_size, "stack": attempt.stack, **attempt.topology} == now
    assert view.latest.step == steps and view.last_step == steps
    latest = view.checkpoints[view.latest.checkpoint_id]
    assert {"world_size": latest.world_size, "stack": latest.stack, **latest.topology} == now
    assert {s.rank for s in latest.shards} == set(range(now["world_size"]))


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> Path:
    """A run trained to step 4 by fsdp on 2 ranks (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("fsdp2")
    train(root / "run", stack="fsdp", nproc=2, steps=4, out=root / "first")
    return root / "run"


FSDP2 = {"world_size": 2, "stack": "fsdp", "tp": 1, "pp": 1, "dp": 2}


@pytest.mark.timeout(2 * RANK_TIMEOUT + 30)
def test_fsdp2_checkpoint_resumes_on_one_process(fsdp2_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp2_run, run_dir)
    checkpoint = Ledger.open(run_dir, read_only=True).projection().latest.checkpoint_id
    loaded = train(run_dir, stack="fsdp", nproc=1, steps=6, out=tmp_path / "resumed")
    assert_resumed(run_dir, loaded, from_checkpoint=checkpoint, saved_by=FSDP2, steps=6, check_optimizer=True,
                   now={"world_size": 1, "stack": "fsdp", "tp": 1, "pp": 1, "dp": 1})


@pytest.mark.timeout(2 * RANK_TIMEOUT + 30)
def test_fsdp2_checkpoint_resumes_under_ddp2(fsdp2_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp2_run, run_dir)
    checkpoint = Ledger.open(run_dir, read_only=True).projection().latest.checkpoint_id
    loaded = train(run_dir, stack="ddp", nproc=2, steps=6, out=tmp_path / "resumed")
    assert_resumed(run_dir, loaded, from_checkpoint=checkpoint, saved_by=FSDP2, steps=6, check_optimizer=True,
                   now={"world_size": 2, "stack": "ddp", "tp": 1, "pp": 1, "dp": 2})


@pytest.mark.timeout(2 * RANK_TIMEOUT + 30)
def test_fsdp2_checkpoint_resumes_under_tppp_pp2(fsdp2_run, tmp_path):
    # Each pipeline stage picks its blocks' weights and optimizer state out of the whole-model checkpoint.
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp2_run, run_dir)
    checkpoint = Ledger.open(run_dir, read_only=True).projection().latest.checkpoint_id
    loaded = train(run_dir, stack="tppp", pp=2, nproc=2, steps=6, out=tmp_path / "resumed")
    assert_resumed(run_dir, loaded, from_checkpoint=checkpoint, saved_by=FSDP2, steps=6, check_optimizer=False,
                   now={"world_size": 2, "stack": "tppp", "tp": 1, "pp": 2, "dp": 1})


@pytest.mark.timeout(2 * RANK_TIMEOUT + 30)
def test_tppp_2x2_checkpoint_resumes_under_fsdp2(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, stack="tppp", tp=2, pp=2, nproc=4, steps=4, out=tmp_path / "first")
    view = Ledger.open(run_dir, read_only=True).projection()
    checkpoint = view.latest.checkpoint_id
    tppp = {"world_size": 4, "stack": "tppp", "tp": 2, "pp": 2, "dp": 1}
    assert {"world_size": view.checkpoints[checkpoint].world_size, "stack": view.checkpoints[checkpoint].stack,
            **view.checkpoints[checkpoint].topology} == tppp
    loaded = train(run_dir, stack="fsdp", nproc=2, steps=6, out=tmp_path / "resumed")
    assert_resumed(run_dir, loaded, from_checkpoint=checkpoint, saved_by=tppp, steps=6, check_optimizer=True,
                   now=FSDP2)


@pytest.mark.timeout(RANK_TIMEOUT + 30)
def test_checkpoint_that_does_not_map_is_refused_naming_the_saving_layout(fsdp2_run, tmp_path):
    # A model whose MLP is wider than the saved one: no planner can map the shards onto it.
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp2_run, run_dir)
    config = {"run_dir": str(run_dir), "stack": "ddp", "steps": 6, "print_every": 0, "seed": 3,
              "job": {**SPEC.as_dict(), "hidden": 48}}
    result = run_ranks("trainer_rank.py", ["--config", json.dumps(config), "--out", str(tmp_path / "out")], 1,
                       timeout=RANK_TIMEOUT, log_dir=tmp_path / "logs")
    assert result.returncodes == [2], result.describe()
    message = result.outputs[0]
    assert "was saved by --stack fsdp --nproc 2 --tp 1 --pp 1" in message
    assert "cannot be resharded to --stack ddp --nproc 1 --tp 1 --pp 1" in message
    assert "blocks.0.w1" in message
    assert Ledger.open(run_dir, read_only=True).projection().last_step == 4
