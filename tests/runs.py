"""Builders of realistic run directories for CLI tests, written through the public ``ledger`` API.

Every builder returns a :class:`RunInfo` naming what it made, so tests assert on
facts instead of re-deriving them. A "crash" is simulated the way it happens:
the writer is abandoned mid-checkpoint (shards partly written and recorded, a
temp file left behind, no commit, no ``attempt.ended``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ledger import Ledger
from ledger.events import AttemptEnded, MetricRecorded, PreemptionSignalled, ShardWritten, StepCompleted

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunInfo:
    """What a builder put in a run directory."""

    run_dir: Path
    committed: list[str] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    stray_files: list[Path] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)


def cid_for(step: int, epoch: int) -> str:
    """Checkpoint ids the way the trainer names them."""
    return f"step{step:06d}-e{epoch}"


def write_shards(led: Ledger, cid: str, epoch: int, ranks, *, size: int = 256) -> list[ShardWritten]:
    """Durably write one shard file per rank (deterministic bytes) and return the facts to record."""
    shards = []
    for rank in ranks:
        payload = hashlib.sha256(f"{cid}/{rank}".encode()).digest() * (size // 32 + 1)
        info = led.blobs.write(f"{led.blobs.checkpoint_dir(cid, epoch)}/rank{rank:03d}.bin", payload[:size])
        shards.append(ShardWritten(checkpoint_id=cid, rank=rank, location=info.location, bytes=info.bytes,
                                   hash=info.hash, codec=info.codec))
    return shards


def save_checkpoint(led: Ledger, epoch: int, step: int, *, ranks=(0, 1), commit: bool = True,
                    eval_loss: float | None = None) -> str:
    """Run the full two-phase protocol for one checkpoint at ``step``."""
    cid = cid_for(step, epoch)
    led.begin_checkpoint(checkpoint_id=cid, step=step, ranks=list(ranks), world_size=len(ranks), stack="ddp",
                         topology={"dp": len(ranks), "tp": 1, "pp": 1}, epoch=epoch)
    led.record_shards(cid, write_shards(led, cid, epoch, ranks), epoch=epoch)
    if commit:
        led.commit_checkpoint(cid, epoch=epoch)
    if eval_loss is not None:
        led.append(MetricRecorded(name="eval_loss", value=eval_loss, step=step, checkpoint_id=cid), epoch=epoch)
    return cid


def train_steps(led: Ledger, epoch: int, first: int, last: int, *, every: int = 5) -> None:
    """Record ``step.completed`` with a falling loss, sampled every ``every`` steps."""
    for step in range(first, last + 1):
        if step % every == 0 or step == last:
            led.append(StepCompleted(step=step, metrics={"loss": 4.0 / (1 + step / 10)}), epoch=epoch)


def start(run_dir: Path, **config) -> Ledger:
    """A fresh run with ``run.started`` recorded."""
    led = Ledger.open(run_dir)
    led.promote_aliases = False  # hand-built logs hold exactly the events a test appends (tests count them)
    led.start_run(run_id=run_dir.name, config={"stack": "ddp", **config}, config_hash="cafe" * 4, code_id="abc1234")
    return led


def build_healthy_run(run_dir: Path, **config) -> RunInfo:
    """Two attempts (the first preempted and requeued), five committed checkpoints, eval metrics, all ended cleanly."""
    info = RunInfo(run_dir)
    led = start(run_dir, **config)
    first = led.begin_attempt(job_id="1001", world_size=2, stack="ddp", topology={"dp": 2, "tp": 1, "pp": 1})
    info.epochs.append(first.epoch)
    losses = {10: 2.0, 20: 1.2, 30: 1.5}
    for step in (10, 20, 30):
        train_steps(led, first.epoch, step - 9, step)
        info.committed.append(save_checkpoint(led, first.epoch, step, eval_loss=losses[step]))
    train_steps(led, first.epoch, 31, 33)
    led.append(PreemptionSignalled(signal="SIGTERM", step=33), epoch=first.epoch)
    led.append(AttemptEnded(epoch=first.epoch, reason="preempted", last_step=33), epoch=first.epoch)
    second = led.begin_attempt(job_id="1002", world_size=2, stack="ddp", topology={"dp": 2, "tp": 1, "pp": 1},
                               resumed_from=info.committed[-1])
    info.epochs.append(second.epoch)
    for step, loss in ((40, 1.1), (50, 1.3)):
        train_steps(led, second.epoch, step - 9, step)
        info.committed.append(save_checkpoint(led, second.epoch, step, eval_loss=loss))
    led.append(AttemptEnded(epoch=second.epoch, reason="completed", last_step=50), epoch=second.epoch)
    led.close()
    return info


def crash_mid_checkpoint(led: Ledger, epoch: int, step: int, *, ranks=(0, 1)) -> tuple[str, Path]:
    """Begin a checkpoint, write and record rank 0's shard, leave rank 1's temp file, then stop (no commit, no end)."""
    cid = cid_for(step, epoch)
    led.begin_checkpoint(checkpoint_id=cid, step=step, ranks=list(ranks), world_size=len(ranks), stack="ddp",
                         topology={"dp": len(ranks), "tp": 1, "pp": 1}, epoch=epoch)
    led.record_shards(cid, write_shards(led, cid, epoch, ranks[:1]), epoch=epoch)
    # Rank 1 died inside AtomicFile: its bytes are in a temp file that was never renamed.
    tmp = led.blobs.path(f"{led.blobs.checkpoint_dir(cid, epoch)}/.rank{ranks[-1]:03d}.bin.0123abcd.tmp")
    tmp.write_bytes(b"\0" * 100)
    return cid, tmp


def build_crashed_run(run_dir: Path, *, restart: bool = True, **config) -> RunInfo:
    """Attempt 1 commits two checkpoints, then crashes mid-save; with ``restart`` attempt 2 resumes and finishes.

    Also leaves an aborted checkpoint with its shard on disk, and a stray file in a
    blob directory no checkpoint ever recorded (as a crashed writer of an unknown
    save would).
    """
    info = RunInfo(run_dir)
    led = start(run_dir, **config)
    first = led.begin_attempt(job_id="2001", world_size=2, stack="ddp", topology={"dp": 2, "tp": 1, "pp": 1})
    info.epochs.append(first.epoch)
    for step in (10, 20):
        train_steps(led, first.epoch, step - 9, step)
        info.committed.append(save_checkpoint(led, first.epoch, step, eval_loss=3.0 - step / 10))
    aborted = save_checkpoint(led, first.epoch, 25, commit=False)
    led.abort_checkpoint(aborted, "rank 1 ran out of disk", epoch=first.epoch)
    info.aborted.append(aborted)
    train_steps(led, first.epoch, 21, 30)
    torn, tmp = crash_mid_checkpoint(led, first.epoch, 30)
    info.torn.append(torn)
    info.stray_files.append(tmp)
    stray = led.blobs.path(f"{led.blobs.checkpoint_dir('step000027-e1', first.epoch)}/rank000.bin")
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"x" * 10)
    info.stray_files.append(stray)
    # The writer is abandoned here: no close, no attempt.ended (the process "died").
    if restart:
        led2 = Ledger.open(run_dir)
        second = led2.begin_attempt(job_id="2002", world_size=2, stack="ddp", topology={"dp": 2, "tp": 1, "pp": 1},
                                    resumed_from=info.committed[-1])
        info.epochs.append(second.epoch)
        train_steps(led2, second.epoch, 21, 40)
        info.committed.append(save_checkpoint(led2, second.epoch, 40, eval_loss=0.9))
        led2.append(AttemptEnded(epoch=second.epoch, reason="completed", last_step=40), epoch=second.epoch)
        led2.close()
    led.close()
    return info


def build_big_log(run_dir: Path, events: int) -> None:
    """A ledger with about ``events`` step events (for pipe and streaming tests), written in big batches."""
    led = start(run_dir)
    attempt = led.begin_attempt(job_id="big")
    batch = 5000
    for first in range(1, events + 1, batch):
        led.append_many([StepCompleted(step=s, metrics={"loss": 1.0}) for s in range(first, min(first + batch, events + 1))],
                        epoch=attempt.epoch)
    led.close()


def snapshot_tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative name -> sha256 of its bytes) plus every directory name."""
    tree = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            tree[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = "dir"
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                tree[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return tree


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for running ``python -m cli`` in a subprocess from the repo root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_LEDGER_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra)
    return env


def cli_argv(*args: str) -> list[str]:
    """``[python, -m, cli, *args]``."""
    return [sys.executable, "-m", "cli", *map(str, args)]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:  # noqa: ANN001 - pytest's capsys
    """Run the real ``ckpt-ledger`` entry point in-process; returns (exit code, stdout, stderr)."""
    from cli.main import main

    saved = sys.argv
    sys.argv = ["ckpt-ledger", *map(str, argv)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return code, out, err


#: A writer that commits two checkpoints and then starts a third; run it with
#: CKPT_LEDGER_CRASH_AT=ledger.before_commit:3 and it is SIGKILLed with every shard of
#: the third recorded but no commit (argv[1] is the run directory).
KILLED_WRITER = """
import sys
from pathlib import Path
from runs import save_checkpoint, start, train_steps
led = start(Path(sys.argv[1]))
attempt = led.begin_attempt(job_id="3001", world_size=2, stack="ddp")
for step in (10, 20, 30):
    train_steps(led, attempt.epoch, step - 9, step)
    save_checkpoint(led, attempt.epoch, step)
raise SystemExit("the crash point did not fire")
"""


def run_killed_writer(run_dir: Path) -> int:
    """Run :data:`KILLED_WRITER` in a real process; returns its exit status (-9 when killed as planned)."""
    import subprocess

    env = cli_env(CKPT_LEDGER_CRASH_AT="ledger.before_commit:3")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(run_dir)], env=env, capture_output=True,
                          timeout=120)
    return proc.returncode
