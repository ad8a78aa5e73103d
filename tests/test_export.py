"""`ckpt-ledger export`: consolidated model-only weights, verified, read-only, plain names."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from ledger import Ledger
from trainer_support import assert_bitwise_equal, reference_run, run_cli, run_cli_in_process, view_of

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(400)]


@pytest.mark.parametrize("stack", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_export_latest_best_and_id_in_both_formats(tmp_path, tmp_path_factory, snapshot_files, stack):
    run_dir, latest = reference_run(tmp_path_factory, stack)
    before = snapshot_files(run_dir)
    view = view_of(run_dir)

    best_out, id_out, st_out = tmp_path / "best.pt", tmp_path / "first.pt", tmp_path / "latest.safetensors"
    first = min(view.checkpoints.values(), key=lambda c: c.step)
    for ref, out, fmt in (("best", best_out, "torch"), (first.checkpoint_id, id_out, "torch"),
                          ("latest", st_out, "safetensors")):
        done = run_cli_in_process("export", str(run_dir), "--checkpoint", ref, "--out", str(out), "--format", fmt)
        assert done.returncode == 0, done.stderr

    assert not any(k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k for k in latest)
    assert_bitwise_equal(latest, load_file(st_out))
    best = torch.load(best_out, weights_only=True)
    if view.best.checkpoint_id == view.latest.checkpoint_id:
        assert_bitwise_equal(latest, best)
    early = torch.load(id_out, weights_only=True)
    assert sorted(early) == sorted(latest) and not all(torch.equal(early[k], latest[k]) for k in latest)
    # Read-only: not a byte of the run directory changed, and nothing was added.
    assert snapshot_files(run_dir) == before


def test_export_errors_have_contract_exit_codes(tmp_path, tmp_path_factory):
    run_dir, _ = reference_run(tmp_path_factory, "ddp")
    out = tmp_path / "out.pt"

    missing = run_cli_in_process("export", str(run_dir), "--checkpoint", "nope", "--out", str(out))
    assert missing.returncode == 1 and "nope" in missing.stderr, missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr

    (tmp_path / "empty").mkdir()
    no_ledger = run_cli("export", str(tmp_path / "empty"), "--out", str(out), timeout=120)
    assert no_ledger.returncode == 2, no_ledger.stderr

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "ledger.db").write_bytes(b"this is not a database" * 100)
    corrupt_ledger = run_cli("export", str(garbage), "--out", str(out), timeout=120)
    assert corrupt_ledger.returncode == 2, corrupt_ledger.stderr
    assert not out.exists()


def test_export_verifies_shard_hashes_first(tmp_path, tmp_path_factory):
    reference_dir, _ = reference_run(tmp_path_factory, "ddp")
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir)
    latest = view_of(run_dir).latest
    shard = next(s for s in latest.shards if s.location.endswith(".distcp"))
    path = Ledger.open(run_dir, read_only=True).blobs.path(shard.location)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))

    out = tmp_path / "out.pt"
    done = run_cli_in_process("export", str(run_dir), "--out", str(out))
    assert done.returncode == 1, done.stderr
    assert "does not match" in done.stderr and "export refused" in done.stderr
    assert not out.exists()
