"""TrainerConfig validation, experiment identity, the stack registry and `train`'s usage errors."""

from __future__ import annotations

import hashlib
import json

import pytest

from trainer import TrainerConfig
from trainer.identity import canonical_json, code_id, config_hash
from trainer.stacks import PLANNED_STACKS, Stack, Topology, available_stacks, get_stack, register_stack
from trainer_support import run_cli


def test_defaults_are_valid():
    cfg = TrainerConfig(run_dir="runs/x")
    assert (cfg.stack, cfg.steps, cfg.ckpt_every, cfg.eval_every) == ("ddp", 300, 50, 50)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("run_dir", ""),
        ("stack", "zero3"),
        ("steps", 0),
        ("steps", 1.5),
        ("steps", True),
        ("ckpt_every", 0),
        ("eval_every", -1),
        ("log_every", 0),
        ("keep_last", -1),
        ("keep_every", 0),
        ("keep_best", -2),
        ("best_mode", "lowest"),
        ("resume", " "),
        ("seed", -1),
        ("seed", 2**32),
        ("lr", 0.0),
        ("weight_decay", -0.1),
        ("tp", 0),
        ("dist_timeout_s", 0),
    ],
)
def test_invalid_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=field if field != "stack" else "stack must be one of"):
        TrainerConfig(**{"run_dir": "runs/x", field: value})


def test_data_parallel_stacks_refuse_tensor_and_pipeline_degrees():
    with pytest.raises(ValueError, match="supports tp <= 1"):
        TrainerConfig(run_dir="r", stack="ddp", tp=2)
    with pytest.raises(ValueError, match="supports pp <= 1"):
        TrainerConfig(run_dir="r", stack="fsdp", pp=2)


def test_planned_stack_is_named_as_not_implemented(monkeypatch):
    import trainer.stacks

    monkeypatch.setitem(trainer.stacks.PLANNED_STACKS, "zero-bubble", "lands in a later release")
    with pytest.raises(ValueError, match="not implemented yet"):
        TrainerConfig(run_dir="r", stack="zero-bubble")


def test_config_is_kw_only_and_slotted():
    with pytest.raises(TypeError):
        TrainerConfig("runs/x")  # type: ignore[misc]
    with pytest.raises(AttributeError):
        TrainerConfig(run_dir="r").no_such_field = 1  # type: ignore[attr-defined]


def test_config_hash_is_sha256_of_sorted_canonical_json():
    cfg = TrainerConfig(run_dir="runs/a", seed=3, job={"b": 1, "a": 2})
    canonical = cfg.canonical()
    assert "run_dir" not in canonical and "resume" not in canonical
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    assert canonical_json(canonical) == text
    assert config_hash(canonical) == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    # Where the run lives and how it is resumed do not change the experiment; the seed does.
    same = TrainerConfig(run_dir="elsewhere", seed=3, resume="latest", job={"a": 2, "b": 1}).canonical()
    assert config_hash(same) == config_hash(canonical)
    assert config_hash(TrainerConfig(run_dir="runs/a", seed=4).canonical()) != config_hash(canonical)


def test_code_id_is_git_sha_or_none(tmp_path):
    cid = code_id()
    assert cid is None or len(cid.split("-")[0]) == 40
    assert code_id(tmp_path) is None  # not a git checkout


def test_topology_infers_dp_and_rejects_non_divisors():
    assert Topology.resolve(8, tp=2, pp=2) == Topology(tp=2, pp=2, dp=2)
    assert Topology.resolve(2).as_dict() == {"tp": 1, "pp": 1, "dp": 2}
    with pytest.raises(ValueError, match="does not divide"):
        Topology.resolve(6, tp=4)


def test_registry_lists_stacks_and_explains_unknown_ones():
    assert set(available_stacks()) >= {"ddp", "fsdp"}
    assert get_stack("fsdp").name == "fsdp"
    with pytest.raises(ValueError, match="unknown stack"):
        get_stack("nope")
    assert get_stack("tppp").name == "tppp" and "tppp" not in PLANNED_STACKS


def test_a_new_stack_is_one_registry_entry(monkeypatch):
    import trainer.stacks

    monkeypatch.setattr(trainer.stacks, "_REGISTRY", dict(trainer.stacks._REGISTRY))

    class EchoStack(Stack):
        name = "echo-test"
        max_tp = None

        def parallelize(self, model, mesh):  # noqa: ANN001, ANN201
            return model

    register_stack(EchoStack)
    assert "echo-test" in available_stacks()
    assert get_stack("echo-test").topology(4, tp=4) == Topology(tp=4, pp=1, dp=1)
    TrainerConfig(run_dir="r", stack="echo-test", tp=4)  # the config accepts any registered stack


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stack", "bogus"], "bogus"),
        (["--stack", "tppp", "--nproc", "3", "--tp", "2"], "does not divide"),
        (["--stack", "ddp", "--nproc", "2", "--tp", "2"], "supports tp <= 1"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_train_usage_errors_exit_2_with_one_line(tmp_path, args, message):
    done = run_cli("train", "--run-dir", str(tmp_path / "run"), *args, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "ledger.db").exists()
