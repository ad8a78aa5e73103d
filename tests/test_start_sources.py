"""Where an attempt starts: explicit --resume > automatic resume > --pretrained > fresh; corruption falls back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ledger import Ledger
from trainer import BadInputError, Trainer, TrainerConfig
from trainer.default_job import JobSpec, TinyLM, default_job
from trainer_support import committed_steps, events_of, run_cli, view_of

pytestmark = pytest.mark.timeout(300)

SHORT = ["--ckpt-every", "5", "--eval-every", "0"]


def _train(run_dir: Path, *args: str):
    return run_cli("train", "--run-dir", str(run_dir), *SHORT, *args)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _distcp_shard(run_dir: Path, checkpoint_id: str) -> Path:
    ckpt = view_of(run_dir).checkpoints[checkpoint_id]
    [shard] = [s for s in ckpt.shards if s.location.endswith(".distcp")]
    return Ledger.open(run_dir, read_only=True).blobs.path(shard.location)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished single-process run: checkpoints at steps 5, 10 and 12."""
    run_dir = tmp_path_factory.mktemp("sources") / "run"
    done = _train(run_dir, "--steps", "12")
    assert done.returncode == 0, done.stderr
    assert committed_steps(run_dir) == [5, 10, 12]
    return run_dir


def test_explicit_resume_of_a_missing_checkpoint_is_an_error(trained_run):
    before = [e.seq for e in events_of(trained_run)]
    done = _train(trained_run, "--steps", "20", "--resume", "step999999-e9")
    assert done.returncode == 1, done.stderr
    assert "step999999-e9" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    # Nothing started: no attempt, no checkpoint, no step — the ledger is exactly as before.
    assert [e.seq for e in events_of(trained_run)] == before


def test_explicit_resume_on_an_empty_run_is_an_error(tmp_path):
    done = _train(tmp_path / "run", "--steps", "5", "--resume", "latest")
    assert done.returncode == 1, done.stderr
    assert "no checkpoint 'latest'" in done.stderr
    assert view_of(tmp_path / "run").attempts == []


def test_missing_pretrained_file_is_bad_input(tmp_path):
    done = _train(tmp_path / "run", "--steps", "5", "--pretrained", str(tmp_path / "nope.pt"))
    assert done.returncode == 2 and "--pretrained" in done.stderr, done.stderr


def test_corrupt_shard_is_reported_and_the_previous_checkpoint_is_used(tmp_path, trained_run):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    view = view_of(run_dir)
    newest, previous = view.resume_candidates()[:2]
    assert (newest.step, previous.step) == (12, 10)
    shard = _distcp_shard(run_dir, newest.checkpoint_id)
    _flip_byte(shard)

    done = _train(run_dir, "--steps", "15")
    assert done.returncode == 0, done.stderr
    [found] = [e.event for e in events_of(run_dir, "corruption.detected")]
    assert found.checkpoint_id == newest.checkpoint_id and found.location.endswith(shard.name)
    assert found.expected_hash == [s.hash for s in newest.shards if s.location == found.location][0]
    assert found.found_hash is not None and found.found_hash != found.expected_hash
    view = view_of(run_dir)
    assert view.checkpoints[newest.checkpoint_id].status == "corrupt"
    assert view.attempts[-1].resumed_from == previous.checkpoint_id
    assert view.attempts[-1].status == "completed" and view.resume.step == 15


def test_no_loadable_checkpoint_refuses_to_start_fresh(tmp_path, trained_run):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    for ckpt in view_of(run_dir).resume_candidates():
        _distcp_shard(run_dir, ckpt.checkpoint_id).unlink()  # a missing shard is corruption too
    attempts_before = len(view_of(run_dir).attempts)

    done = _train(run_dir, "--steps", "15")
    assert done.returncode == 1, done.stderr
    assert "refusing to start from scratch" in done.stderr
    found = [e.event for e in events_of(run_dir, "corruption.detected")]
    assert len(found) == 3 and all(f.found_hash is None for f in found)
    assert len(view_of(run_dir).attempts) == attempts_before

    # Once every checkpoint is known corrupt, the refusal comes from the ledger alone.
    again = _train(run_dir, "--steps", "15")
    assert again.returncode == 1 and "refusing to start from scratch" in again.stderr, again.stderr
    assert committed_steps(run_dir) == []


def test_automatic_resume_wins_over_pretrained(tmp_path, trained_run):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    weights = tmp_path / "weights.pt"
    torch.save(TinyLM(JobSpec()).state_dict(), weights)
    done = _train(run_dir, "--steps", "13", "--pretrained", str(weights))
    assert done.returncode == 0, done.stderr
    assert view_of(run_dir).attempts[-1].resumed_from is not None


@pytest.fixture
def single_process_env(monkeypatch):
    """A clean environment for an in-process, 1-rank gloo group (restored afterwards)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("stack", ["ddp", "fsdp"])
def test_pretrained_loads_model_weights_only(tmp_path, single_process_env, stack):
    torch.manual_seed(1234)
    source = TinyLM(JobSpec()).state_dict()
    weights = tmp_path / "weights.pt"
    torch.save({f"module.{k}": v for k, v in source.items()}, weights)  # wrapper prefixes are stripped

    model_fn, data_fn, loss_fn, job = default_job()
    cfg = TrainerConfig(run_dir=str(tmp_path / "run"), stack=stack, steps=5, pretrained=str(weights), job=job)
    trainer = Trainer(cfg, model_fn=model_fn, data_fn=data_fn, loss_fn=loss_fn)
    try:
        loaded = trainer.stack.full_model_state(trainer.model)
        assert sorted(loaded) == sorted(source)
        assert all(torch.equal(loaded[k], source[k]) for k in source)
        # Weights only: the step, optimizer and schedule start fresh, and nothing was resumed.
        assert trainer.step == 0 and not trainer.optimizer.state
        assert trainer.scheduler.last_epoch == 0
        assert trainer.data.state_dict()["position"] == 0
    finally:
        trainer.close()
    [attempt] = view_of(tmp_path / "run").attempts
    assert attempt.resumed_from is None


def test_pretrained_that_does_not_fit_is_bad_input(tmp_path, single_process_env):
    weights = tmp_path / "weights.pt"
    torch.save({"not.a.parameter": torch.zeros(3)}, weights)
    model_fn, data_fn, loss_fn, job = default_job()
    cfg = TrainerConfig(run_dir=str(tmp_path / "run"), steps=5, pretrained=str(weights), job=job)
    with pytest.raises(BadInputError, match="does not fit the model"):
        Trainer(cfg, model_fn=model_fn, data_fn=data_fn, loss_fn=loss_fn)


@pytest.mark.multiprocess
def test_resume_on_a_different_world_size_and_stack(tmp_path, tmp_path_factory):
    """A 2-rank fsdp checkpoint resumes on 1 ddp rank: DCP reshards; the change is recorded, not hidden."""
    import shutil

    from trainer_support import reference_run

    reference_dir, _ = reference_run(tmp_path_factory, "fsdp")
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir)
    done = run_cli("train", "--run-dir", str(run_dir), "--stack", "ddp", "--nproc", "1", "--steps", "33",
                   "--ckpt-every", "10", "--eval-every", "0")
    assert done.returncode == 0, done.stderr
    assert "world size changed 2 -> 1" in done.stdout
    attempt = view_of(run_dir).attempts[-1]
    assert attempt.resumed_from.startswith("step000030") and attempt.world_size == 1 and attempt.stack == "ddp"
    assert attempt.previous_topology == {"world_size": 2, "stack": "fsdp", "tp": 1, "pp": 1, "dp": 2}
    assert committed_steps(run_dir)[-1] == 33
