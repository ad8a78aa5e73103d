"""Helpers for the trainer's tests: run ``ckpt-ledger`` in real subprocesses and read the ledger.

Every multi-process run uses gloo on loopback (``GLOO_SOCKET_IFNAME=lo``,
``MASTER_ADDR=127.0.0.1``); the launcher picks a free port itself. Every subprocess has
a timeout and runs in its own session, so a test can signal the launcher alone or its
whole process group (as ``scancel`` does), and a hung run is killed, never waited on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ledger import Ledger, LedgerNotFoundError
from ledger.view import View

REPO = Path(__file__).resolve().parents[1]

#: Small and quick: a few checkpoints, evaluation at each, little output.
QUICK = ["--steps", "30", "--ckpt-every", "10", "--eval-every", "10"]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a ``ckpt-ledger`` subprocess (crash points and rank variables removed)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CKPT_LEDGER_CRASH_AT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
           and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(PYTHONPATH=str(REPO), GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m cli ARGS`` to completion (killing its whole group on timeout)."""
    proc = start_cli(*args, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"ckpt-ledger {' '.join(args)} hung for {timeout}s\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli_in_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``ckpt-ledger ARGS`` through the same entry point, in this process: exit code, stdout, stderr.

    For commands whose process boundary is not what a test is about (``export``, ``gc``,
    ``audit`` after a run): a subprocess spends ~3 s starting Python and importing torch
    before ``export`` does anything. Like :func:`run_cli` it runs in the repository root
    without crash points or rank variables, and with Python's default warning filters
    (pytest's would turn a printed warning into a failure). ``train`` stays a subprocess:
    it installs signal handlers and starts process groups.
    """
    if args and args[0] == "train":
        raise ValueError("run `train` with run_cli or start_cli: it must own its process")
    import contextlib
    import traceback
    import warnings

    from click.testing import CliRunner

    from cli.main import main

    target = env or cli_env()
    overrides: dict[str, str | None] = {**{k: None for k in os.environ if k not in target}, **target}
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    with CliRunner().isolation(env=overrides) as (stdout, stderr, _), warnings.catch_warnings():
        warnings.resetwarnings()  # then the interpreter's own defaults, as a fresh process has them
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        sys.argv = ["ckpt-ledger", *args]
        os.chdir(REPO)
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except Exception:  # noqa: BLE001 - what the interpreter does with an uncaught error: traceback, exit 1
            traceback.print_exc()
            code = 1
        finally:
            sys.argv = saved_argv
            os.chdir(saved_cwd)
            with contextlib.suppress(ValueError):
                sys.stdout.flush()
                sys.stderr.flush()
        return subprocess.CompletedProcess(["ckpt-ledger", *args], code, stdout.getvalue().decode(),
                                           stderr.getvalue().decode())


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m cli ARGS`` in a new session (its own process group)."""
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads (the launcher and its workers)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def finish(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    """Wait for a started run, killing its group if it hangs."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"run hung for {timeout}s\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def view_of(run_dir: Path) -> View:
    """The run's projection, read-only."""
    return Ledger.open(run_dir, read_only=True).projection()


def events_of(run_dir: Path, *tags: str) -> list:
    """Stored events (optionally of some tags), read-only."""
    return Ledger.open(run_dir, read_only=True).events(tags=list(tags) or None)


def wait_for(predicate: Callable[[], bool], *, timeout: float, proc: subprocess.Popen | None = None,
             what: str = "condition") -> None:
    """Poll ``predicate`` every 20 ms; fail if it stays false for ``timeout`` s or ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except LedgerNotFoundError:
            pass
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run exited ({proc.returncode}) before {what}\n{out}\n{err}")
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def committed_steps(run_dir: Path) -> list[int]:
    """Steps of the committed checkpoints, in order."""
    return sorted(c.step for c in view_of(run_dir).checkpoints.values() if c.status == "committed")


def export_state(run_dir: Path, out: Path, checkpoint: str = "latest") -> dict[str, torch.Tensor]:
    """``ckpt-ledger export`` (in this process) then ``torch.load`` (weights only)."""
    done = run_cli_in_process("export", str(run_dir), "--checkpoint", checkpoint, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return torch.load(out, weights_only=True)


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, and every tensor equal bit for bit (``torch.equal``)."""
    assert sorted(a) == sorted(b)
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


_REFERENCE: dict[tuple, tuple[Path, dict[str, torch.Tensor]]] = {}


def reference_run(tmp_path_factory, stack: str, nproc: int = 2, *extra: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """An uninterrupted run and its exported final weights, computed once per test session."""
    key = (stack, nproc, extra)
    if key not in _REFERENCE:
        run_dir = tmp_path_factory.mktemp(f"reference-{stack}")
        done = run_cli("train", "--run-dir", str(run_dir), "--stack", stack, "--nproc", str(nproc), *QUICK, *extra)
        assert done.returncode == 0, done.stderr
        _REFERENCE[key] = (run_dir, export_state(run_dir, run_dir.parent / f"{run_dir.name}.pt"))
    return _REFERENCE[key]
