"""Loading a checkpoint never runs code: a malicious pickle whose hash was re-recorded is refused."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from trainer_support import QUICK, REPO, cli_env, run_cli, run_cli_in_process, view_of

from ledger import Ledger
from ledger.events import AttemptEnded, ShardWritten
from trainer.checkpoint_storage import LedgerStorageReader
from trainer.train_state import UnsafeCheckpointError, capture_rng, from_bytes, restore_rng, to_bytes


class _Planted:
    """Pickles as a call that creates ``path`` when unpickled by a full (unsafe) pickle load."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def _read_everything(led: Ledger, directory: str) -> dict:
    """A DCP checkpoint as one nested dict (the test's own, trusted read of a checkpoint it just made)."""
    state: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load_state_dict(state, storage_reader=LedgerStorageReader(led.blobs, directory),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def _plant(run_dir: Path, target: Path, where: str) -> str:
    """Copy the run's newest checkpoint as a new one whose ``where`` item is a malicious pickle, and
    record it in the ledger with matching hashes (as an attacker with write access to both would)."""
    led = Ledger.open(run_dir)
    source = led.projection().resume
    state = _read_everything(led, source.shards[0].location.rsplit('/', 1)[0])
    if where == "dcp":
        state["trainer"] = _Planted(target)  # DCP's own non-tensor item layer
    else:
        state["trainer"] = to_bytes({"step": source.step, "scheduler": _Planted(target)})  # ours, inside the bytes
    attempt = led.begin_attempt(resumed_from=source.checkpoint_id, world_size=1, stack="ddp")
    cid = f"step{source.step + 1:06d}-e{attempt.epoch}"
    led.begin_checkpoint(checkpoint_id=cid, step=source.step + 1, ranks=[0], world_size=1, stack="ddp",
                         topology=source.topology, epoch=attempt.epoch)
    location = led.blobs.checkpoint_dir(cid, attempt.epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=FileSystemWriter(led.blobs.path(location)), no_dist=True)
    assert not target.exists()
    shards = []
    for path in sorted(led.blobs.path(location).iterdir()):
        digest, size = led.blobs.hash_file(f"{location}/{path.name}")
        shards.append(ShardWritten(checkpoint_id=cid, rank=0, location=f"{location}/{path.name}", bytes=size,
                                   hash=digest))
    led.record_shards(cid, shards, epoch=attempt.epoch)
    led.commit_checkpoint(cid, epoch=attempt.epoch)
    led.append(AttemptEnded(epoch=attempt.epoch, reason="completed"), epoch=attempt.epoch)
    led.close()
    return cid


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished QUICK run with synchronous checkpoints (each test plants in a copy of it)."""
    run_dir = tmp_path_factory.mktemp("safe-loading") / "run"
    done = run_cli("train", "--run-dir", str(run_dir), *QUICK, "--sync-checkpoint")
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where", ["dcp", "ours"])
def test_a_malicious_pickle_with_a_rerecorded_hash_is_refused_never_run(tmp_path, trained_run, where):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    target = tmp_path / "pwned"
    cid = _plant(run_dir, target, where)
    done = run_cli("train", "--run-dir", str(run_dir), "--steps", "40", "--ckpt-every", "10", "--eval-every", "0")
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "refused" in errors[0] and "nothing in it was run" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not target.exists()
    assert view_of(run_dir).resume.checkpoint_id == cid  # nothing was recorded against it: it verifies fine
    # export (which reads only tensors) does not run it either.
    run_cli_in_process("export", str(run_dir), "--checkpoint", cid, "--out", str(tmp_path / "m.pt"))
    assert not target.exists()


def test_rng_state_round_trips_through_weights_only_loading():
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    saved = from_bytes(to_bytes({"rng": capture_rng()}))["rng"]
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(0)
    np.random.seed(0)
    restore_rng(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_an_old_numpy_rng_state_still_loads_with_the_exact_allowlist():
    import numpy as np

    buffer = io.BytesIO()
    torch.save({"numpy": np.random.get_state()}, buffer)  # as checkpoints before plain RNG states held it
    loaded = from_bytes(buffer.getvalue())["numpy"]
    assert loaded[0] == "MT19937" and loaded[1].dtype == np.uint32
    with pytest.raises(UnsafeCheckpointError, match="outside the allowlist"):
        from_bytes(to_bytes({"x": np.float64(1.0).__class__}))


def test_every_torch_load_of_checkpoint_bytes_is_weights_only():
    found = subprocess.run(["git", "grep", "-n", "weights_only=False", "--", "trainer", "ledger", "cli"], cwd=REPO,
                           capture_output=True, text=True, env=cli_env())
    assert found.stdout == "", found.stdout
    assert sys.executable
