"""The ``tppp`` stack: tensor + pipeline (+ data) parallel training, its checkpoints and its topology checks.

The mechanics tests train the same tiny model split across ranks and unsplit in one
process, and require the same losses and weights (dropout off; float tolerance for the
reordered sums of tensor parallelism). The CLI test runs the real ``ckpt-ledger train``
at tp=2 x pp=2 on 4 processes and checks what the ledger recorded and what
``ckpt-ledger export`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distributed_ranks import run_cli, run_ranks, run_trainer
from ledger import Ledger
from tppp_reference import SPEC, reference_run
from trainer.checkpointing import Candidate
from trainer.default_job import JobSpec, TinyLM
from trainer.export import consolidated_model_state
from trainer.stacks.tppp import TpppStack, stage_blocks
from trainer.stacks.base import Topology
from trainer_support import run_cli_in_process

pytestmark = pytest.mark.multiprocess
RANK_TIMEOUT = 150
STEPS = 3


@pytest.mark.parametrize(("tp", "pp", "nproc", "schedule", "microbatches"), [
    pytest.param(2, 1, 2, "1F1B", None, id="tp2-pp1"),
    pytest.param(1, 2, 2, "GPipe", 4, id="tp1-pp2-gpipe"),
    pytest.param(2, 1, 4, "1F1B", None, id="tp2-pp1-dp2", marks=pytest.mark.slow),
])
@pytest.mark.timeout(RANK_TIMEOUT + 30)
def test_split_training_matches_the_unsplit_model(tmp_path, tp, pp, nproc, schedule, microbatches):
    args = ["--tp", str(tp), "--pp", str(pp), "--schedule", schedule, "--steps", str(STEPS), "--out", str(tmp_path)]
    if microbatches:
        args += ["--microbatches", str(microbatches)]
    result = run_ranks("tppp_worker.py", args, nproc, timeout=RANK_TIMEOUT, log_dir=tmp_path / "logs")
    assert result.returncodes == [0] * nproc, result.describe()
    report = json.loads((tmp_path / "result.json").read_text())
    ranks = report["ranks"]
    dp = nproc // (tp * pp)
    assert report["topology"] == {"tp": tp, "pp": pp, "dp": dp}

    # Same losses (every rank reports the dp-mean) and weights as one process on all dp ranks' batches.
    ref_losses, ref_eval, ref_weights = reference_run(STEPS, dp)
    for rank in ranks:
        assert rank["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
        assert rank["eval_loss"] == ranks[0]["eval_loss"] == pytest.approx(ref_eval, rel=1e-4)
    full = torch.load(tmp_path / "full.pt")
    assert list(full) == list(ref_weights)
    for key, value in ref_weights.items():
        # Adam divides by sqrt(v): where a gradient is ~0, float reordering moves a weight by up to
        # ~1e-5 of its lr-sized step. A missing reduction or a stale replica moves it by ~lr (1e-2).
        assert (full[key] - value).abs().max() < 1e-4, key

    # Reloads: consolidated weights, DCP checkpoint with optimizer state, and one more identical step.
    for rank in ranks:
        assert rank["full_round_trip"] and rank["optim_round_trip"] and rank["resume_matches"], rank

    # State-dict keys are the unsplit model's: each parameter on exactly one pp stage, tp shards as DTensors.
    stage_keys: dict[int, set[str]] = {}
    for rank in ranks:
        stage_keys.setdefault(rank["pp_rank"], set()).update(rank["keys"]["model"])
        assert rank["keys"]["optim_state"] == sorted(k for k in rank["keys"]["model"])
        assert rank["keys"]["param_groups"] == [n for n, _ in TinyLM(SPEC).named_parameters()]
        assert bool(rank["keys"]["dtensor"]) == (tp > 1)
        if tp > 1:
            assert any(k.endswith(".wq.weight") for k in rank["keys"]["dtensor"])
    assert sorted(set().union(*stage_keys.values())) == sorted(ref_weights)
    assert sum(len(keys) for keys in stage_keys.values()) == len(ref_weights)
    assert stage_keys[pp - 1] >= {"head.weight", "norm.weight"} and "tok_emb.weight" in stage_keys[0]

    # The rank-sharded checkpoint consolidates offline (what `ckpt-ledger export` does) to the same weights.
    exported = consolidated_model_state(tmp_path / "dcp")
    assert all(torch.equal(exported[k], full[k]) for k in full) and exported.keys() == full.keys()


@pytest.mark.timeout(2 * RANK_TIMEOUT + 60)
def test_tp2_pp2_on_four_processes_trains_commits_and_exports(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "model.pt"
    trained = run_cli(["train", "--run-dir", str(run_dir), "--stack", "tppp", "--tp", "2", "--pp", "2",
                       "--nproc", "4", "--steps", "6", "--ckpt-every", "3", "--eval-every", "3"],
                      timeout=2 * RANK_TIMEOUT)
    assert trained.returncode == 0, trained.stdout + trained.stderr

    view = Ledger.open(run_dir, read_only=True).projection()
    topology = {"tp": 2, "pp": 2, "dp": 1}
    assert view.last_step == 6 and view.latest.step == 6
    assert view.attempts[-1].topology == topology and view.attempts[-1].world_size == 4
    assert [c.step for c in view.checkpoints.values() if c.status == "committed"] == [3, 6]
    for ckpt in view.checkpoints.values():
        assert (ckpt.stack, ckpt.world_size, ckpt.topology) == ("tppp", 4, topology)
        assert {s.rank for s in ckpt.shards} == {0, 1, 2, 3}
    ledger = Ledger.open(run_dir, read_only=True)
    started = [e.event for e in ledger.events(tags=["checkpoint.started"])]
    assert [(e.world_size, e.stack, e.topology) for e in started] == [(4, "tppp", topology)] * 2
    steps = [e.event for e in ledger.events(tags=["step.completed"])]
    assert [e.step for e in steps] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(e.metrics["loss"])) for e in steps)
    assert len(list(ledger.events(tags=["metric.recorded"]))) == 2

    exported = run_cli_in_process("export", str(run_dir), "--checkpoint", "latest", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    weights = torch.load(out)
    torch.manual_seed(0)  # the run's seed: the weights it started from
    initial = TinyLM(JobSpec()).state_dict()
    assert sorted(weights) == sorted(initial)
    assert all(weights[k].shape == initial[k].shape for k in initial)
    assert not torch.equal(weights["blocks.3.w2.weight"], initial["blocks.3.w2.weight"])
    assert not torch.equal(weights["tok_emb.weight"], initial["tok_emb.weight"])


@pytest.mark.parametrize(("args", "expected"), [
    pytest.param(["--tp", "2", "--pp", "2", "--nproc", "2"], "does not divide the world size 2", id="tp-pp-not-dividing"),
    pytest.param(["--pp", "8", "--nproc", "8"], "4 blocks and cannot be split into pp=8", id="fewer-blocks-than-pp"),
    pytest.param(["--tp", "3", "--nproc", "3"], "tp=3 must divide them", id="heads-not-divisible-by-tp"),
])
@pytest.mark.timeout(90)
def test_bad_topology_exits_2_before_any_process_starts(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    result = run_cli(["train", "--run-dir", str(run_dir), "--stack", "tppp", *args], timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()  # refused before any worker, process group or ledger


def test_blocks_are_split_into_contiguous_stages():
    assert stage_blocks(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_blocks(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert stage_blocks(4, 4) == [range(i, i + 1) for i in range(4)]


def test_stack_options_are_validated():
    with pytest.raises(ValueError, match="schedule must be one of 1F1B, GPipe"):
        TpppStack(schedule="Interleaved")
    with pytest.raises(ValueError, match="microbatches must be a positive integer"):
        TpppStack(microbatches=0)
    with pytest.raises(ValueError, match="1F1B schedule needs at least pp=4 microbatches"):
        TpppStack(microbatches=2).topology(4, pp=4)
    assert TpppStack(schedule="GPipe", microbatches=2).topology(8, tp=2, pp=2) == Topology(tp=2, pp=2, dp=2)
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        TpppStack().topology(6, tp=2, pp=2)


@pytest.mark.timeout(3 * RANK_TIMEOUT + 30)
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    # Dropout on: tensor-parallel peers must keep drawing identical masks across the restart.
    job = JobSpec(vocab=32, dim=32, heads=4, layers=4, hidden=64, seq_len=16, batch_size=8, dropout=0.1,
                  eval_batches=1)

    def config(run_dir: Path) -> dict:
        return {"run_dir": str(run_dir), "stack": "tppp", "tp": 2, "pp": 1, "steps": 4, "ckpt_every": 2,
                "eval_every": 0, "print_every": 0, "warmup_steps": 1, "seed": 5, "job": job.as_dict(),
                "dist_timeout_s": 15.0}

    run_trainer(config(tmp_path / "straight"), 2, out=tmp_path / "a", timeout=RANK_TIMEOUT)
    # Rank 0 is SIGKILLed right after committing step 2; its peer fails on the broken group.
    killed = run_ranks("trainer_rank.py", ["--config", json.dumps(config(tmp_path / "resumed")), "--out",
                                           str(tmp_path / "b")], 2, timeout=RANK_TIMEOUT, log_dir=tmp_path / "b",
                       env={"CKPT_LEDGER_CRASH_AT": "trainer.after_commit"})
    assert killed.returncodes[0] == -9 and killed.returncodes[1] != 0, killed.describe()
    assert Ledger.open(tmp_path / "resumed", read_only=True).projection().latest.step == 2
    run_trainer(config(tmp_path / "resumed"), 2, out=tmp_path / "c", timeout=RANK_TIMEOUT)
    finals = []
    for run in ("straight", "resumed"):
        ledger = Ledger.open(tmp_path / run, read_only=True)
        checkpoint = ledger.projection().latest
        assert checkpoint.step == 4
        finals.append(consolidated_model_state(
            ledger.blobs.path(Candidate.of(ledger.projection().checkpoint(checkpoint.checkpoint_id)).directory())))
    assert Ledger.open(tmp_path / "resumed", read_only=True).projection().attempts[-1].resumed_from is not None
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key
