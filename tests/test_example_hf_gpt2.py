"""examples/hf_gpt2.py: a transformers GPT-2 from a config, trained by the Trainer on FSDP2 (its blocks as the
units, the user's optimizer and clipped step), exported to safetensors and loaded into GPT2LMHeadModel."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from trainer_support import REPO, cli_env, export_state, finish, view_of

transformers = pytest.importorskip(
    "transformers", reason="the [transformers] extra is not installed (pip install 'ckpt-ledger[transformers]')")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="the [export] extra is not installed")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_gpt2_trains_under_torchrun_fsdp_and_loads_back_into_transformers(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "gpt2.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "examples" / "hf_gpt2.py"), "--run-dir", str(run_dir), "--stack", "fsdp", "--steps", "20",
           "--out", str(out)]
    done = finish(subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GPT2LMHeadModel loaded it" in done.stdout

    [attempt] = view_of(run_dir).attempts
    assert (attempt.status, attempt.stack, attempt.world_size) == ("completed", "fsdp", 2)
    weights = safetensors_torch.load_file(out)
    exported = export_state(run_dir, tmp_path / "same.pt")  # the CLI's export of the same checkpoint
    assert sorted(weights) == sorted(exported) and all(torch.equal(weights[k], exported[k]) for k in weights)

    sys.path.insert(0, str(REPO / "examples"))
    try:
        from hf_gpt2 import gpt2_config
    finally:
        sys.path.pop(0)
    model = transformers.GPT2LMHeadModel(gpt2_config(64, 32))
    model.load_state_dict(weights, strict=False)
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key
    ids = torch.randint(0, 64, (2, 32))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
