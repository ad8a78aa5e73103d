"""LedgerCheckpoint against real PyTorch Lightning (CPU, tiny models): kill/resume, corruption, retention, DDP."""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

L = pytest.importorskip("lightning", reason="needs pip install 'ckpt-ledger[lightning]'")

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from ledger import FencedError, Ledger  # noqa: E402
from trainer.integrations.lightning import LedgerCheckpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "lightning_job.py"
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)


# -- helpers ---------------------------------------------------------------------------------------

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


class Quadratic(L.LightningModule):
    """A one-parameter model whose validation metric is scripted by step (to make an old checkpoint best)."""

    def __init__(self, val_metric=None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.val_metric = val_metric

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return ((x - self.w) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        loss = ((x - self.w) ** 2).mean()
        if self.val_metric is not None:
            loss = torch.tensor(float(self.val_metric(self.trainer.global_step)))
        self.log("val_loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0))), batch_size=8)


def fit(run_dir: Path, steps: int, *, every: int = 10, val_metric=None, **policy) -> LedgerCheckpoint:
    cb = LedgerCheckpoint(run_dir, every_n_train_steps=every, monitor="val_loss", mode="min", **policy)
    trainer = L.Trainer(max_steps=steps, callbacks=[cb], val_check_interval=every, check_val_every_n_epoch=None,
                        default_root_dir=run_dir, **QUIET)
    trainer.fit(Quadratic(val_metric), loader(), loader(), ckpt_path=LedgerCheckpoint.resume_path(run_dir))
    return cb


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- the acceptance scenario ------------------------------------------------------------------------

def test_sigkilled_job_rerun_resumes_from_the_ledger_target_and_finishes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # SIGKILLed by the ledger's own crash point inside the third save (shards recorded, commit not yet
    # appended): deterministic, unlike a kill timed from outside, which a loaded machine can miss.
    job = start_example(run_dir, "--steps", "60", "--every", "10", env={"CKPT_LEDGER_CRASH_AT": "ledger.before_commit:3"})
    out, _ = job.communicate(timeout=240)
    assert job.returncode == -signal.SIGKILL, out

    target = inspect_json(run_dir)["resume"]
    assert target is not None and target["step"] >= 20
    resume_path = LedgerCheckpoint.resume_path(run_dir)
    assert resume_path == str(run_dir / "blobs" / target["checkpoint_id"] / "e1" / "model.ckpt")

    rerun = start_example(run_dir, "--steps", "60", "--every", "10")
    out, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, out
    assert f"Restoring states from the checkpoint path at {resume_path}" in out

    view = inspect_json(run_dir)
    first, second = view["attempts"][:2]
    assert len(view["attempts"]) == 2
    assert first["status"] == "crashed" and first["resumed_from"] is None
    assert second["status"] == "completed" and second["resumed_from"] == target["checkpoint_id"]
    # The rerun continued from the checkpoint's step: its first step.completed is the next one.
    with Ledger.open(run_dir, read_only=True) as led:
        second_steps = [e.event.step for e in led.events(tags=["step.completed"]) if e.epoch == 2]
    assert second_steps[0] == target["step"] + 1
    assert view["resume"]["step"] == 60 and view["last_step"] == 60
    # Steps the killed attempt ran past its last checkpoint were lost, and goodput says so.
    assert first["last_step"] > target["step"] and 0 < view["goodput"] < 1.0
    timeline = cli("timeline", str(run_dir), "--out", str(tmp_path / "timeline.svg"))
    assert timeline.returncode == 0, timeline.stderr
    audit = cli("audit", str(run_dir), "--verify-blobs")
    assert audit.returncode == 0, audit.stdout + audit.stderr


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_NODEID": "0",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_RESTART_COUNT": "0"}


@pytest.mark.parametrize("sig, env", [
    (signal.SIGTERM, SLURM_ENV),  # Lightning's SLURM handlers are installed too (auto-requeue); ours chains to them
    (signal.SIGUSR1, {}),  # no Lightning handler: fit() returns and the callback's exit_code says 75
], ids=["sigterm-under-slurm", "sigusr1"])
def test_preemption_signal_saves_records_preempted_and_exits_75(tmp_path: Path, sig: signal.Signals,
                                                                env: dict) -> None:
    run_dir = tmp_path / "run"
    job = start_example(run_dir, "--steps", "400", "--every", "100", "--step-sleep", "0.03", env=env)
    deadline = time.monotonic() + 120
    while not ((run_dir / "ledger.db").exists() and events(run_dir, "step.completed")):
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    job.send_signal(sig)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 75, out

    (started,) = events(run_dir, "attempt.started")
    (ended,) = events(run_dir, "attempt.ended")
    (signalled,) = events(run_dir, "preemption.signalled")
    assert ended.reason == "preempted" and signalled.signal == sig.name
    assert started.job_id == env.get("SLURM_JOB_ID") and (started.slurm is not None) == bool(env)
    view = inspect_json(run_dir)
    assert view["resume"]["step"] == ended.last_step == signalled.step  # saved at the step it stopped on
    assert 0 < ended.last_step < 400


# -- corruption, retention, audit -------------------------------------------------------------------

def test_flipped_byte_in_newest_checkpoint_falls_back_to_previous_and_is_recorded(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fit(run_dir, 30)
    with Ledger.open(run_dir, read_only=True) as led:
        newest = led.projection().resume
    assert newest.step == 30
    flip_byte(run_dir / newest.shards[0].location)

    path = LedgerCheckpoint.resume_path(run_dir)
    assert path is not None and "step000020-e1" in path
    (corrupt,) = events(run_dir, "corruption.detected")
    assert corrupt.checkpoint_id == newest.checkpoint_id and corrupt.location == newest.shards[0].location
    assert corrupt.found_hash != corrupt.expected_hash
    assert LedgerCheckpoint.resume_path(run_dir) == path  # asked again: same answer, reported once
    assert len(events(run_dir, "corruption.detected")) == 1

    fit(run_dir, 40, keep_last=2)  # resumes from step 20, finishes; retention removes the corrupt one
    view = inspect_json(run_dir)
    assert view["attempts"][1]["resumed_from"] == "step000020-e1"
    assert view["resume"]["step"] == 40
    statuses = {c["checkpoint_id"]: c["status"] for c in view["checkpoints"]}
    assert statuses[newest.checkpoint_id] == "deleted"
    audit = cli("audit", str(run_dir), "--verify-blobs")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_retention_keeps_exactly_last_k_and_the_best_even_when_old(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # val_loss is lowest at step 20, so an old checkpoint stays best while later ones rotate out.
    fit(run_dir, 70, val_metric=lambda step: abs(step - 20) + 1.0, keep_last=2, keep_best=1)

    view = inspect_json(run_dir)
    alive = {c["step"] for c in view["checkpoints"] if c["status"] == "committed"}
    assert alive == {70, 60, 20}
    assert view["best"]["step"] == 20 and view["best"]["value"] == 1.0
    deleted = {c["step"] for c in view["checkpoints"] if c["status"] == "deleted"}
    assert deleted == {10, 30, 40, 50}
    # Deletion went through the ledger: requested before deleted, and the files are gone from disk.
    with Ledger.open(run_dir, read_only=True) as led:
        tags = [(e.tag, e.event.checkpoint_id) for e in led.events(
            tags=["checkpoint.deletion_requested", "checkpoint.deleted"])]
        kept_files = {s.location for c in led.projection().checkpoints.values() if c.status == "committed"
                      for s in c.shards}
    for cid in {cid for _, cid in tags}:
        assert tags.index(("checkpoint.deletion_requested", cid)) < tags.index(("checkpoint.deleted", cid))
    on_disk = {p.relative_to(run_dir).as_posix() for p in (run_dir / "blobs").rglob("*") if p.is_file()}
    assert on_disk == kept_files
    # The metric arrived after its checkpoint was committed (validation runs after the save) and still made it best.
    with Ledger.open(run_dir, read_only=True) as led:
        order = [(e.tag, getattr(e.event, "checkpoint_id", None)) for e in led.events(
            tags=["checkpoint.committed", "metric.recorded"])]
    assert order.index(("checkpoint.committed", "step000020-e1")) < order.index(("metric.recorded", "step000020-e1"))
    audit = cli("audit", str(run_dir), "--verify-blobs")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_a_newer_attempt_fences_the_running_job_which_stops_recording(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"

    class SecondJobStarts(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 15:
                with Ledger.open(run_dir) as other:
                    other.begin_attempt(stack="another-job")

    cb = LedgerCheckpoint(run_dir, every_n_train_steps=10)
    trainer = L.Trainer(max_steps=40, callbacks=[SecondJobStarts(), cb], default_root_dir=run_dir, **QUIET)
    with pytest.raises(FencedError, match="epoch 2"):
        trainer.fit(Quadratic(), loader())
    with Ledger.open(run_dir, read_only=True) as led:
        stored = led.events()
    second_began = next(e.seq for e in stored if e.tag == "attempt.started" and e.event.epoch == 2)
    assert not [e for e in stored if e.seq > second_began and e.epoch == 1]  # nothing recorded once fenced
    assert [c.step for c in led.projection().checkpoints.values()] == [10]


def test_nothing_to_resume_is_none_and_creates_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "fresh"
    assert LedgerCheckpoint.resume_path(run_dir) is None
    assert not run_dir.exists()


def test_bad_arguments_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_best needs monitor"):
        LedgerCheckpoint(tmp_path, keep_best=1)
    with pytest.raises(ValueError, match="every_n_train_steps"):
        LedgerCheckpoint(tmp_path, every_n_train_steps=0)


def test_missing_lightning_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.integrations import MissingFrameworkError

    for name in ['lightning', 'lightning.pytorch', 'lightning.pytorch.utilities.exceptions']:
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without the extra looks like
    monkeypatch.delitem(sys.modules, "trainer.integrations.lightning")
    with pytest.raises(MissingFrameworkError) as err:
        importlib.import_module("trainer.integrations.lightning")
    assert str(err.value) == "lightning is not installed; install it with: pip install 'ckpt-ledger[lightning]'"


# -- DDP: two CPU processes over gloo ---------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_ddp_two_cpu_processes_record_and_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    args = ("--every", "10", "--devices", "2", "--strategy", "ddp")
    first = start_example(run_dir, "--steps", "20", *args, env=env)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    env["MASTER_PORT"] = str(free_port())
    second = start_example(run_dir, "--steps", "30", *args, env=env)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out

    view = inspect_json(run_dir)
    assert [a["status"] for a in view["attempts"]] == ["completed", "completed"]
    assert view["attempts"][1]["resumed_from"] == "step000020-e1"
    ckpts = {c["step"]: c for c in view["checkpoints"]}
    assert set(ckpts) == {10, 20, 30}
    assert all(c["world_size"] == 2 and c["stack"] == "lightning-ddp" for c in ckpts.values())
    assert len(events(run_dir, "attempt.started")) == 2  # rank 1 never began an attempt of its own
    audit = cli("audit", str(run_dir), "--verify-blobs")
    assert audit.returncode == 0, audit.stdout + audit.stderr
