"""LedgerCallback against the real Hugging Face Trainer (CPU, a tiny GPT-2 built from a config)."""

from __future__ import annotations

import importlib
import json
import os
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="needs pip install 'ckpt-ledger[transformers]'")
pytest.importorskip("accelerate", reason="needs pip install 'ckpt-ledger[transformers]'")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from ledger import Ledger  # noqa: E402
from trainer.integrations.transformers import LedgerCallback  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "hf_trainer_job.py"
sys.path.insert(0, str(REPO / "examples"))
from hf_trainer_job import Patterns  # noqa: E402


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=120)


def inspect_json(run_dir: Path) -> dict:
    out = cli("inspect", str(run_dir), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def events(run_dir: Path, tag: str) -> list:
    with Ledger.open(run_dir, read_only=True) as led:
        return [e.event for e in led.events(tags=[tag])]


def start_example(run_dir: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(EXAMPLE), "--run-dir", str(run_dir), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def audit_clean(run_dir: Path) -> None:
    audit = cli("audit", str(run_dir), "--verify-blobs")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def tiny_trainer(run_dir: Path, steps: int, cb: LedgerCallback, *, save_steps: int = 10, compute_metrics=None,
                 **extra_args) -> Trainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    args = TrainingArguments(
        output_dir=str(run_dir / "hf-staging"), max_steps=steps, save_steps=save_steps, eval_strategy="steps",
        eval_steps=save_steps, per_device_train_batch_size=8, per_device_eval_batch_size=16, use_cpu=True,
        report_to="none", disable_tqdm=True, seed=0, **extra_args,
    )
    return Trainer(model=model, args=args, train_dataset=Patterns(128, seed=1), eval_dataset=Patterns(16, seed=2),
                   callbacks=[cb], compute_metrics=compute_metrics)


def train(run_dir: Path, steps: int, **kwargs) -> LedgerCallback:
    cb = LedgerCallback(run_dir, **{k: kwargs.pop(k) for k in ("keep_last", "keep_best", "metric") if k in kwargs})
    tiny_trainer(run_dir, steps, cb, **kwargs).train(resume_from_checkpoint=LedgerCallback.resume_path(run_dir))
    return cb


# -- the acceptance scenario ------------------------------------------------------------------------

def test_sigkilled_job_rerun_resumes_from_the_ledger_target_and_finishes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # SIGKILLed by the ledger's own crash point inside the third save (files recorded, commit not yet
    # appended): deterministic, unlike a kill timed from outside, which a loaded machine can miss.
    job = start_example(run_dir, "--steps", "40", "--save-steps", "10", env={"CKPT_LEDGER_CRASH_AT": "ledger.before_commit:3"})
    out, _ = job.communicate(timeout=300)
    assert job.returncode == -signal.SIGKILL, out

    target = inspect_json(run_dir)["resume"]
    resume_path = LedgerCallback.resume_path(run_dir)
    assert resume_path == str(run_dir / "blobs" / target["checkpoint_id"] / "e1" / "checkpoint")

    rerun = start_example(run_dir, "--steps", "40", "--save-steps", "10")
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    view = inspect_json(run_dir)
    assert [a["status"] for a in view["attempts"]] == ["crashed", "completed"]
    assert view["attempts"][1]["resumed_from"] == target["checkpoint_id"]
    assert view["resume"]["step"] == 40 and view["last_step"] == 40
    # The rerun continued from the checkpoint's step: its first step.completed is the next one.
    with Ledger.open(run_dir, read_only=True) as led:
        second_steps = [e.event.step for e in led.events(tags=["step.completed"]) if e.epoch == 2]
    assert second_steps[0] == target["step"] + 1
    audit_clean(run_dir)


def test_sigterm_saves_records_preempted_and_exits_75(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = start_example(run_dir, "--steps", "400", "--save-steps", "100", "--step-sleep", "0.05")
    deadline = time.monotonic() + 180
    while not ((run_dir / "ledger.db").exists() and events(run_dir, "attempt.started")):
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)  # let it take a few steps
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=180)
    assert job.returncode == 75, out
    (ended,) = events(run_dir, "attempt.ended")
    (signalled,) = events(run_dir, "preemption.signalled")
    assert ended.reason == "preempted" and signalled.signal == "SIGTERM"
    assert inspect_json(run_dir)["resume"]["step"] == ended.last_step < 400


# -- corruption, retention, refusals ----------------------------------------------------------------

def test_flipped_byte_in_newest_checkpoint_falls_back_to_previous_and_is_recorded(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(run_dir, 20)
    with Ledger.open(run_dir, read_only=True) as led:
        newest = led.projection().resume
    weights = next(s.location for s in newest.shards if s.location.endswith("model.safetensors"))
    data = bytearray((run_dir / weights).read_bytes())
    data[len(data) // 2] ^= 0x01
    (run_dir / weights).write_bytes(bytes(data))

    path = LedgerCallback.resume_path(run_dir)
    assert path is not None and "step000010-e1" in path
    (corrupt,) = events(run_dir, "corruption.detected")
    assert (corrupt.checkpoint_id, corrupt.location) == (newest.checkpoint_id, weights)

    train(run_dir, 30, keep_last=2)  # resumes from step 10, finishes; retention removes the corrupt one
    view = inspect_json(run_dir)
    assert view["attempts"][1]["resumed_from"] == "step000010-e1"
    assert view["resume"]["step"] == 30
    assert {c["checkpoint_id"]: c["status"] for c in view["checkpoints"]}[newest.checkpoint_id] == "deleted"
    audit_clean(run_dir)


def test_retention_keeps_exactly_last_k_and_an_old_best(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cb = LedgerCallback(run_dir, keep_last=2, keep_best=1, metric="eval_score", mode="min")
    trainer = None

    def score(_prediction) -> dict[str, float]:  # lowest at step 20: an old checkpoint stays best
        return {"score": abs(trainer.state.global_step - 20) + 1.0}

    trainer = tiny_trainer(run_dir, 50, cb, compute_metrics=score)
    trainer.train()
    view = inspect_json(run_dir)
    assert {c["step"] for c in view["checkpoints"] if c["status"] == "committed"} == {50, 40, 20}
    assert {c["step"] for c in view["checkpoints"] if c["status"] == "deleted"} == {10, 30}
    assert view["best"]["step"] == 20 and view["best"]["metric"] == "eval_score"
    with Ledger.open(run_dir, read_only=True) as led:
        kept = {s.location for c in led.projection().checkpoints.values() if c.status == "committed" for s in c.shards}
    assert {p.relative_to(run_dir).as_posix() for p in (run_dir / "blobs").rglob("*") if p.is_file()} == kept
    # Nothing is left in the Trainer's output_dir: every save was moved into the run.
    assert not any((run_dir / "hf-staging").glob("checkpoint-*"))
    audit_clean(run_dir)


@pytest.mark.parametrize("option, message", [
    ({"save_total_limit": 2}, r"drop save_total_limit and pass LedgerCallback\(run_dir, keep_last=2\)"),
    ({"load_best_model_at_end": True}, r"--checkpoint best"),
])
def test_hf_options_that_decide_by_directory_are_refused(tmp_path: Path, option: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_trainer(tmp_path / "run", 10, LedgerCallback(tmp_path / "run"), **option)
    assert not (tmp_path / "run" / "ledger.db").exists()


def test_nothing_to_resume_is_none_and_creates_nothing(tmp_path: Path) -> None:
    assert LedgerCallback.resume_path(tmp_path / "fresh") is None
    assert not (tmp_path / "fresh").exists()


def test_missing_transformers_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.integrations import MissingFrameworkError

    for name in ['transformers']:
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without the extra looks like
    monkeypatch.delitem(sys.modules, "trainer.integrations.transformers")
    with pytest.raises(MissingFrameworkError) as err:
        importlib.import_module("trainer.integrations.transformers")
    assert str(err.value) == "transformers is not installed; install it with: pip install 'ckpt-ledger[transformers]'"


# -- DDP: two CPU processes under torchrun (gloo) ----------------------------------------------------

def torchrun_example(run_dir: Path, steps: int) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         str(EXAMPLE), "--run-dir", str(run_dir), "--steps", str(steps), "--save-steps", "10"],
        cwd=REPO, capture_output=True, text=True, timeout=400,
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"},
    )


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_ddp_two_cpu_processes_record_every_rank_file_and_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = torchrun_example(run_dir, 20)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = torchrun_example(run_dir, 30)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    view = inspect_json(run_dir)
    assert [a["status"] for a in view["attempts"]] == ["completed", "completed"]
    assert view["attempts"][1]["resumed_from"] == "step000020-e1"
    assert view["attempts"][0]["job_id"] is None
    with Ledger.open(run_dir, read_only=True) as led:
        newest = led.projection().resume
    names = {s.location.rsplit("/", 1)[1] for s in newest.shards}
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors"} <= names  # each rank's file recorded
    assert newest.step == 30 and newest.world_size == 2
    audit_clean(run_dir)
