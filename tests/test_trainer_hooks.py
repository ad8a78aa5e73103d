"""The Trainer's extension points: optimizer_fn, scheduler_fn, step_fn / train_step, shard_units (one process)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from trainer import BadInputError, Trainer, TrainerConfig
from trainer.default_job import default_job
from trainer_support import view_of

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
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


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def make(run_dir, steps: int, *, stack: str = "ddp", trainer_class=Trainer, **hooks) -> Trainer:
    model_fn, data_fn, loss_fn, job = default_job()
    cfg = TrainerConfig(run_dir=str(run_dir), stack=stack, steps=steps, ckpt_every=3, eval_every=0, print_every=0,
                        job=job)
    return trainer_class(cfg, model_fn=model_fn, data_fn=data_fn, loss_fn=loss_fn, **hooks)


def final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.stack.full_model_state(trainer.model).items()}


def fit_keeping_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    holder: dict[str, dict[str, torch.Tensor]] = {}
    original = trainer._end

    def end():  # the weights as the attempt ends (close() drops the model)
        holder["w"] = final_weights(trainer)
        return original()

    trainer._end = end
    outcome = trainer.fit()
    assert outcome.exit_code == 0, outcome
    return holder["w"]


def test_own_optimizer_and_schedule_are_checkpointed_and_resume_bitwise(tmp_path):
    uninterrupted = make(tmp_path / "ref", 7, optimizer_fn=sgd, scheduler_fn=step_lr)
    assert isinstance(uninterrupted.optimizer, torch.optim.SGD)
    reference = fit_keeping_weights(uninterrupted)

    assert make(tmp_path / "run", 4, optimizer_fn=sgd, scheduler_fn=step_lr).fit().exit_code == 0
    resumed = make(tmp_path / "run", 7, optimizer_fn=sgd, scheduler_fn=step_lr)
    assert resumed.step == 4 and resumed.scheduler.last_epoch == 4
    assert all("momentum_buffer" in s for s in resumed.optimizer.state.values())  # SGD's state came back
    weights = fit_keeping_weights(resumed)
    assert all(torch.equal(reference[k], weights[k]) for k in reference)
    assert [a.resumed_from for a in view_of(tmp_path / "run").attempts] == [None, "step000004-e1"]


def test_step_fn_replaces_the_step(tmp_path):
    calls = []

    def clipped_step(trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = trainer.loss_fn(trainer.model(inputs), targets)
        loss.backward()
        calls.append(float(torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), max_norm=0.5)))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    assert make(tmp_path / "run", 4, step_fn=clipped_step, scheduler_fn=lambda o: None).fit().exit_code == 0
    assert len(calls) == 4
    steps = [e.step for e in view_of(tmp_path / "run").checkpoints.values()]
    assert steps == [3, 4]


class AccumulatingTrainer(Trainer):
    """Overrides ``train_step``: two half-batches per optimizer step."""

    half_batches = 0

    def train_step(self, inputs, targets):
        total = 0.0
        for part_inputs, part_targets in zip(inputs.chunk(2), targets.chunk(2)):
            loss = self.loss_fn(self.model(part_inputs), part_targets) / 2
            loss.backward()
            total += loss.detach()
            self.half_batches += 1
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total


def test_train_step_can_be_overridden(tmp_path):
    trainer = make(tmp_path / "run", 3, trainer_class=AccumulatingTrainer)
    assert trainer.fit().exit_code == 0
    assert trainer.half_batches == 6


def test_shard_units_choose_the_fsdp_units(tmp_path):
    chosen = []

    def first_block_only(model: nn.Module) -> list[nn.Module]:
        chosen.append(model)
        return [model.blocks[0]]

    trainer = make(tmp_path / "run", 2, stack="fsdp", shard_units=first_block_only)
    try:
        assert len(chosen) == 1
        assert isinstance(trainer.model.blocks[0], FSDPModule) and not isinstance(trainer.model.blocks[1], FSDPModule)
        assert trainer.fit().exit_code == 0
    finally:
        trainer.close()


def test_shard_units_is_refused_by_stacks_that_do_not_shard(tmp_path):
    with pytest.raises(BadInputError, match="shard_units= chooses FSDP units; --stack ddp does not use it"):
        make(tmp_path / "run", 2, shard_units=lambda m: [])
    assert not (tmp_path / "run").exists()
