"""``trainer.CheckpointManager`` in one process with no process group: save, restore, policies, bad input."""

from __future__ import annotations

import random
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from ledger import Ledger
from trainer import BadInputError, CheckpointManager, StartRefusedError
from trainer_support import view_of

pytestmark = pytest.mark.timeout(120)


class Counter:
    """A rank-local stateful object of the user's (a data position)."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def make_state(width: int = 8, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.Dropout(0.2), nn.Linear(width, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    return {"model": model, "optim": optimizer, "sched": scheduler, "data": Counter()}


def train_step(state: dict) -> float:
    model, optimizer = state["model"], state["optim"]
    state["data"].position += 1
    inputs = torch.randn(8, 4) + random.random() + float(np.random.rand())  # every RNG feeds the batch
    loss = model(inputs).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    state["sched"].step()
    return loss.item()


def run(run_dir, steps: int, *, stop_at: int | None = None, **options) -> tuple[dict, CheckpointManager]:
    """A user loop to ``steps`` (leaving it after ``stop_at`` without a final save, as a crash would)."""
    state = make_state()
    with CheckpointManager(run_dir, verbose=False, **options) as ckpt:
        start = ckpt.restore(state)
        for step in range(start + 1, steps + 1):
            loss = train_step(state)
            ckpt.log(step, loss=loss)
            if ckpt.should_save(step) or step == steps:
                ckpt.save(step, state, metrics={"eval_loss": 1.0 / step}, block=step == steps)
            if step == stop_at:
                break
    return state, ckpt


def weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state["model"].state_dict().items()}


def test_resume_continues_bitwise_like_an_uninterrupted_loop(tmp_path):
    reference, done = run(tmp_path / "ref", 12, save_every=4)
    assert done.exit_code == 0
    # Leave after step 6 (checkpoint at 4 committed, steps 5-6 lost), then finish in a new attempt.
    _, first = run(tmp_path / "run", 12, save_every=4, stop_at=6)
    resumed, second = run(tmp_path / "run", 12, save_every=4)
    assert second.restored_from == "step000004-e1" and second.exit_code == 0
    for key, value in weights(reference).items():
        assert torch.equal(value, weights(resumed)[key]), key
    assert resumed["data"].position == reference["data"].position == 12  # restored at 4, then 8 more
    assert resumed["sched"].state_dict() == reference["sched"].state_dict()
    view = view_of(tmp_path / "run")
    assert [a.status for a in view.attempts] == ["completed", "completed"]
    assert view.resume.step == 12 and view.best.checkpoint_id == "step000012-e2"
    assert not dist.is_initialized()  # the one-process group it started is gone again


def test_async_saves_commit_and_retention_keeps_last(tmp_path):
    _, ckpt = run(tmp_path / "run", 12, save_every=2, keep_last=2, async_save=True)
    view = view_of(tmp_path / "run")
    committed = sorted(c.step for c in view.checkpoints.values() if c.status == "committed")
    assert committed == [10, 12]
    assert {c.status for c in view.checkpoints.values()} == {"committed", "deleted"}
    assert len(ckpt.timings) == 6 and sum(not t.synchronous for t in ckpt.timings) == 5


def test_save_every_seconds_saves_when_the_interval_passed(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path / "run", save_every_seconds=3600, verbose=False) as ckpt:
        ckpt.restore(state)
        assert not ckpt.should_save(1)
        ckpt._last_save_time -= 3601  # an hour went by (the clock is rank 0's, read here)
        assert ckpt.should_save(2)
        ckpt.save(2, state, block=True)
        assert not ckpt.should_save(3)


def test_preemption_signal_stops_saves_and_exits_75(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path / "run", verbose=False) as ckpt:
        start = ckpt.restore(state)
        for step in range(start + 1, 100):
            train_step(state)
            ckpt.log(step, loss=0.0)
            if step == 3:
                signal.raise_signal(signal.SIGTERM)
            if ckpt.should_stop(step):
                result = ckpt.save(step, state, block=True)
                break
    assert (step, result.status, ckpt.exit_code) == (3, "committed", 75)
    view = view_of(tmp_path / "run")
    [attempt] = view.attempts
    assert (attempt.status, attempt.reason, attempt.last_step) == ("preempted", "preempted", 3)
    assert view.resume.step == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the manager


def test_an_exception_in_the_loop_records_a_failed_attempt(tmp_path):
    state = make_state()
    with pytest.raises(ZeroDivisionError):
        with CheckpointManager(tmp_path / "run", verbose=False) as ckpt:
            ckpt.restore(state)
            ckpt.log(1, loss=1.0)
            1 / 0
    assert ckpt.exit_code == 1
    [attempt] = view_of(tmp_path / "run").attempts
    assert (attempt.status, attempt.last_step) == ("failed", 1)


def test_a_newer_attempt_fences_the_older_one(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path / "run", verbose=False) as old:
        old.restore(state)
        old.save(1, state, block=True)
        with Ledger.open(tmp_path / "run") as led:  # another job takes over the run
            led.begin_attempt(job_id="new", world_size=1, stack="ddp", topology={"tp": 1, "pp": 1, "dp": 1})
        result = old.save(2, state, block=True)
        assert result.status == "fenced"
        assert old.should_stop(2)
    assert old.exit_code == 1 and "fenced by epoch 2" in old.message


def test_pretrained_initialises_the_model_when_nothing_is_resumed(tmp_path):
    source = make_state(seed=5)["model"]
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.pt")
    state = make_state(seed=1)
    with CheckpointManager(tmp_path / "run", pretrained=str(tmp_path / "w.pt"), verbose=False) as ckpt:
        assert ckpt.restore(state) == 0
    for key, value in source.state_dict().items():
        assert torch.equal(state["model"].state_dict()[key], value)


def test_explicit_resume_of_a_missing_checkpoint_is_refused(tmp_path):
    run(tmp_path / "run", 2, save_every=1)
    with pytest.raises(StartRefusedError, match="--resume step000099-e1"):
        with CheckpointManager(tmp_path / "run", resume="step000099-e1", verbose=False) as ckpt:
            ckpt.restore(make_state())
    assert len(view_of(tmp_path / "run").attempts) == 1


# -- bad input: a one-line error naming what is wrong; nothing written -----------------------------


@pytest.mark.parametrize("options, message", [
    ({"save_every": 0}, "save_every must be a positive integer"),
    ({"save_every_seconds": -1}, "save_every_seconds must be a positive duration"),
    ({"best_mode": "up"}, "best_mode must be 'min' or 'max'"),
    ({"codec": "lz4"}, "codec must be one of"),
    ({"keep_last": -1}, "keep_last"),
    ({"keep_for": "soon"}, "keep_for must be a duration"),
])
def test_bad_arguments_are_refused_before_anything_is_created(tmp_path, options, message):
    with pytest.raises(BadInputError, match=message):
        CheckpointManager(tmp_path / "run", **options)
    assert not (tmp_path / "run").exists() and not dist.is_initialized()


@pytest.mark.parametrize("bad, message", [
    ({"notes": "text"}, r"state\['notes'\] \(str\) has no state_dict"),
    ({"ranks": Counter()}, "state key 'ranks' is reserved"),
    ({"optim2": torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)}, r"state\['optim2'\]: the optimizer's"),
])
def test_a_state_value_that_cannot_be_saved_is_named_and_nothing_is_written(tmp_path, bad, message):
    state = {**make_state(), **bad}
    with pytest.raises(BadInputError, match=message):
        with CheckpointManager(tmp_path / "run") as ckpt:
            ckpt.restore(state)
    assert not (tmp_path / "run").exists()


def test_steps_that_go_backwards_and_double_restores_are_refused(tmp_path):
    run(tmp_path / "run", 4, save_every=4)
    state = make_state()
    with CheckpointManager(tmp_path / "run", verbose=False) as ckpt:
        with pytest.raises(BadInputError, match=r"save\(\) before restore\(\)"):
            ckpt.save(1, state)
        assert ckpt.restore(state) == 4
        with pytest.raises(BadInputError, match="restore.. was already called"):
            ckpt.restore(state)
        with pytest.raises(BadInputError, match=r"save\(step=4\): step 4 is already committed as checkpoint "
                                                r"step000004-e1"):
            ckpt.save(4, state)
        with pytest.raises(BadInputError, match=r"log\(step=3\): steps must not go backwards"):
            ckpt.log(3, loss=1.0)
        with pytest.raises(BadInputError, match="metric 'loss'='x' is not a number"):
            ckpt.log(5, loss="x")
        ckpt.save(6, state, block=True)
        assert ckpt.save(6, state, block=True).status == "committed"  # the same step again: nothing new
        with pytest.raises(BadInputError, match=r"save\(step=5\): steps must not go backwards \(already at step 6\)"):
            ckpt.save(5, state)
    view = view_of(tmp_path / "run")
    assert sorted(c.step for c in view.checkpoints.values()) == [4, 6]


def test_restoring_into_a_different_model_names_the_mismatch_and_records_nothing(tmp_path):
    run(tmp_path / "run", 2, save_every=2)
    before = Ledger.open(tmp_path / "run", read_only=True)
    seq = before.max_seq()
    before.close()
    with pytest.raises(BadInputError, match=r"state does not match checkpoint step000002-e1 \(step 2\): .*model"):
        with CheckpointManager(tmp_path / "run") as ckpt:
            ckpt.restore(make_state(width=16))
    with Ledger.open(tmp_path / "run", read_only=True) as after:
        assert after.max_seq() == seq


def test_blobs_elsewhere_are_recorded_and_used_by_later_attempts(tmp_path):
    run(tmp_path / "run", 4, save_every=2, blobs=str(tmp_path / "store"))
    assert any((tmp_path / "store").rglob(".metadata")) and not (tmp_path / "run" / "blobs").exists()
    _, resumed = run(tmp_path / "run", 6, save_every=2)  # no blobs=: the place run.started recorded
    assert resumed.restored_from == "step000004-e1" and resumed.exit_code == 0
    with pytest.raises(BadInputError, match="drop blobs="):
        run(tmp_path / "run", 8, blobs=str(tmp_path / "elsewhere"))
