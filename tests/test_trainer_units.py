"""Fast, single-process checks of the trainer's pure pieces: source choice, names, schedule, data, RNG."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ledger import Ledger
from ledger.events import ShardWritten
from trainer import StartRefusedError
from trainer.default_job import JobSpec, MarkovText, chain_entropy, transition_matrix
from trainer.pretrained import plain_key
from trainer.preemption import PreemptionWatch
from trainer.sources import fresh_start_refusal, honoured_resume, is_first_launch_attempt, resume_candidates
from trainer.train_state import capture_rng, from_bytes, restore_rng, to_bytes
from trainer.trainer import warmup_cosine


def _committed(led: Ledger, epoch: int, step: int) -> str:
    cid = f"step{step:06d}-e{epoch}"
    led.begin_checkpoint(checkpoint_id=cid, step=step, ranks=[0], world_size=1, stack="ddp", epoch=epoch)
    info = led.blobs.write(f"{led.blobs.checkpoint_dir(cid, epoch)}/.metadata", b"x" * 8)
    led.record_shards(cid, [ShardWritten(checkpoint_id=cid, rank=0, location=info.location, bytes=info.bytes,
                                         hash=info.hash)], epoch=epoch)
    led.commit_checkpoint(cid, epoch=epoch)
    return cid


def test_resume_candidates_follow_the_projection(tmp_path):
    led = Ledger.open(tmp_path)
    attempt = led.begin_attempt(world_size=1, stack="ddp")
    assert resume_candidates(led.projection(), None) == ([], False)
    first, second = _committed(led, attempt.epoch, 5), _committed(led, attempt.epoch, 10)
    candidates, explicit = resume_candidates(led.projection(), None)
    assert [c.checkpoint_id for c in candidates] == [second, first] and not explicit
    assert candidates[0].directory() == f"blobs/{second}/e{attempt.epoch}"

    chosen, explicit = resume_candidates(led.projection(), first)
    assert [c.checkpoint_id for c in chosen] == [first] and explicit
    with pytest.raises(StartRefusedError, match="no checkpoint 'missing'"):
        resume_candidates(led.projection(), "missing")
    led.report_corruption(second, f"blobs/{second}/e1/.metadata", "blake2b:00", None, epoch=attempt.epoch)
    with pytest.raises(StartRefusedError, match="is corrupt"):
        resume_candidates(led.projection(), second)


def test_fresh_start_is_refused_only_when_committed_checkpoints_exist(tmp_path):
    led = Ledger.open(tmp_path)
    attempt = led.begin_attempt(world_size=1, stack="ddp")
    assert fresh_start_refusal(led.projection()) is None  # nothing was ever committed: start fresh
    cid = _committed(led, attempt.epoch, 5)
    assert fresh_start_refusal(led.projection()) is None  # loadable: no refusal either
    led.report_corruption(cid, f"blobs/{cid}/e1/.metadata", "blake2b:00", None, epoch=attempt.epoch)
    assert "refusing to start from scratch" in fresh_start_refusal(led.projection())


def test_explicit_resume_applies_to_the_first_attempt_of_a_launch_only():
    assert is_first_launch_attempt({})
    assert honoured_resume("latest", {}) == "latest"
    assert honoured_resume("latest", {"TORCHELASTIC_RESTART_COUNT": "1"}) is None
    assert honoured_resume("step000005-e1", {"SLURM_RESTART_COUNT": "2"}) is None
    assert honoured_resume(None, {}) is None


def test_plain_keys_drop_wrapper_prefixes():
    assert plain_key("module._orig_mod.blocks.0.wq.weight") == "blocks.0.wq.weight"
    assert plain_key("blocks.1._orig_mod.w1.bias") == "blocks.1.w1.bias"
    assert plain_key("head.weight") == "head.weight"


def test_schedule_warms_up_then_decays_to_a_tenth():
    factor = warmup_cosine(10, 100)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(100) == pytest.approx(0.1)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 100))


def test_data_is_a_pure_function_of_seed_rank_and_position():
    spec = JobSpec()
    a = MarkovText(spec, dp_rank=0, dp_size=2, seed=1)
    b = MarkovText(spec, dp_rank=0, dp_size=2, seed=1)
    other_rank = MarkovText(spec, dp_rank=1, dp_size=2, seed=1)
    first = a.next_batch()
    assert torch.equal(first[0], b.next_batch()[0]) and not torch.equal(first[0], other_rank.next_batch()[0])
    a.next_batch()
    resumed = MarkovText(spec, dp_rank=0, dp_size=2, seed=1)
    resumed.load_state_dict(a.state_dict())
    assert torch.equal(resumed.next_batch()[0], a.next_batch()[0])
    # Every transition in the data is one the chain allows; targets are inputs shifted by one.
    inputs, targets = first
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert (transition_matrix(spec)[inputs, targets] > 0).all()
    assert 0.5 < chain_entropy(spec) < 1.2


def test_rng_capture_and_restore_round_trip_through_bytes():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = from_bytes(to_bytes(capture_rng()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng(saved)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_preemption_watch_only_records_the_first_signal():
    """Signals only set a flag (the loop acts at the step boundary); the first one is kept."""
    import os
    import signal

    with PreemptionWatch() as watch:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # restored on exit


def test_a_diverged_loss_is_left_out_of_the_record_instead_of_failing_the_attempt(tmp_path, capsys):
    from trainer.run_recorder import RunRecorder

    recorder = RunRecorder(str(tmp_path))
    recorder.begin_attempt(world_size=1, stack="ddp", topology={"tp": 1, "pp": 1, "dp": 1}, resumed_from=None,
                          slurm=None, previous_topology=None)
    recorder.step_completed(1, {"loss": 2.5, "lr": 0.1})
    recorder.step_completed(2, {"loss": float("nan"), "lr": 0.1})
    recorder.flush_steps()
    recorder.metric("eval_loss", float("inf"), 2, None)
    recorder.metric("eval_loss", 1.5, 2, None)
    recorder.close()
    assert "loss=nan is not finite" in capsys.readouterr().err
    led = Ledger.open(tmp_path, read_only=True)
    steps = [e.event for e in led.events() if e.tag == "step.completed"]
    assert [(s.step, s.metrics) for s in steps] == [(1, {"loss": 2.5, "lr": 0.1}), (2, {"lr": 0.1})]
    assert [e.event.value for e in led.events() if e.tag == "metric.recorded"] == [1.5]
