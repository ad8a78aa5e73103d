"""One entry point for every way a run is started: ``ckpt-ledger train``, ``torchrun -m trainer``, ``srun``.

* Inside an external launcher (torchrun set ``RANK``; or one task of a multi-task
  ``srun``), this process *is* a worker: it trains and exits with the outcome's code.
* ``--nproc 1`` without restarts trains in this process (a 1-rank gloo group).
* Otherwise torch's elastic agent starts ``nproc`` local workers (``elastic_launch``),
  restarting all of them up to ``--max-restarts`` times after a worker dies; each
  restart is a new attempt that resumes from the ledger's projection.

Preemption: the agent catches SIGTERM/SIGUSR1 sent to the launcher alone and forwards
it to the workers, then waits (``CKPT_LEDGER_SHUTDOWN_TIMEOUT`` seconds, default 600)
for them to checkpoint instead of killing them; when the whole process group is
signalled (``scancel``) the workers get it directly as well, which is harmless. Workers
report preemption and fencing as return values rather than exit codes, so the agent
never restarts a preempted or fenced job. After a signal the launcher reads how the
attempt ended from the ledger and exits 75 only if it ended ``preempted`` (state saved).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

from ledger import CorruptLedgerError, LedgerError, LedgerNotFoundError, SchemaTooNewError
from trainer.errors import EXIT_PREEMPTED, EXIT_PROBLEM, EXIT_USAGE, TrainerError
from trainer.process_group import apply_single_node_defaults, under_srun

#: How long the launcher lets signalled workers finish their checkpoint before killing them.
SHUTDOWN_TIMEOUT_ENV = "CKPT_LEDGER_SHUTDOWN_TIMEOUT"
#: ``fork`` or ``spawn``: how the elastic agent starts workers (default: fork on CPU-only hosts).
START_METHOD_ENV = "CKPT_LEDGER_START_METHOD"
PREEMPTION_AND_STOP_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


@dataclass(frozen=True, slots=True)
class LaunchOutcome:
    """What ``ckpt-ledger train`` exits with, and the one line it prints when not 0."""

    exit_code: int
    message: str | None = None


def debug_enabled() -> bool:
    """``CKPT_LEDGER_DEBUG=1`` shows tracebacks instead of one-line errors."""
    return os.environ.get("CKPT_LEDGER_DEBUG", "") not in ("", "0")


def _ledger_exit_code(err: LedgerError) -> int:
    if isinstance(err, (CorruptLedgerError, SchemaTooNewError, LedgerNotFoundError)):
        return EXIT_USAGE
    return EXIT_PROBLEM


def run_worker(config: dict[str, Any]) -> LaunchOutcome:
    """Train as one rank of the job; every rank returns the same outcome.

    Known refusals (a missing ``--resume`` checkpoint, a fenced attempt, bad input) are
    returned, not raised, so that an elastic agent does not restart them. Anything else
    is a crash: it propagates, and the agent may restart the workers.
    """
    import torch

    from trainer.config import TrainerConfig
    from trainer.default_job import JobSpec, default_job
    from trainer.trainer import Trainer

    # Tiny models on shared CPUs run fastest (and reproducibly) with one intra-op thread per rank.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = TrainerConfig(**config)
    job_fields = {k: v for k, v in cfg.job.items() if k != "name"}
    model_fn, data_fn, loss_fn, _ = default_job(JobSpec(**job_fields))
    try:
        outcome = Trainer(cfg, model_fn=model_fn, data_fn=data_fn, loss_fn=loss_fn).fit()
    except TrainerError as err:
        return LaunchOutcome(err.exit_code, str(err))
    except LedgerError as err:
        return LaunchOutcome(_ledger_exit_code(err), str(err).splitlines()[0])
    except Exception as err:
        # A crash: one line (a traceback with CKPT_LEDGER_DEBUG=1), then die at once. Crash-only:
        # a broken process group can block interpreter teardown, and the launcher (or the next
        # attempt) recovers from the ledger, not from this process.
        if debug_enabled():
            traceback.print_exc()
        print(f"ckpt-ledger: worker rank {os.environ.get('RANK', '?')} crashed: "
              f"{type(err).__name__}: {' '.join(str(err).split())[:300]}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_PROBLEM)
    return LaunchOutcome(outcome.exit_code, outcome.message)


def inside_external_launcher(env: dict[str, str] | os._Environ) -> bool:
    """Whether torchrun (``RANK`` set) or a multi-task ``srun`` already made this process a worker."""
    return "RANK" in env or under_srun(env)


def launch(config: dict[str, Any], *, nproc: int = 1, max_restarts: int = 0) -> LaunchOutcome:
    """Run the job: as a worker of an external launcher, in this process, or under the elastic agent."""
    if inside_external_launcher(os.environ):
        return run_worker(config)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if nproc == 1 and max_restarts == 0:
        return run_worker(config)
    return _elastic(config, nproc=nproc, max_restarts=max_restarts)


def _start_method() -> str:
    """``fork`` on CPU-only hosts (workers skip re-importing torch; the launcher has touched no
    device and runs no torch threads), ``spawn`` when CUDA is present. Override with
    ``CKPT_LEDGER_START_METHOD``."""
    chosen = os.environ.get(START_METHOD_ENV)
    if chosen:
        return chosen
    import torch

    return "spawn" if torch.cuda.is_available() else "fork"


def run_elastic_worker(config: dict[str, Any]) -> LaunchOutcome:
    """:func:`run_worker` as started by the elastic agent.

    A forked worker inherits the agent's handlers, which turn SIGTERM/SIGINT/... into
    exceptions meant for the agent; give the worker the usual ones back (the trainer then
    catches SIGTERM/SIGUSR1 itself).
    """
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return run_worker(config)


def _newest_epoch(run_dir: str) -> int:
    from ledger import Ledger

    try:
        view = Ledger.open(run_dir, read_only=True).projection()
    except LedgerNotFoundError:
        return 0
    return max((a.epoch for a in view.attempts), default=0)


def _after_signal(run_dir: str, epoch_before: int, signal_name: str) -> LaunchOutcome:
    """The launcher was signalled: exit 75 only if the workers' attempt ended preempted (saved)."""
    from ledger import Ledger

    try:
        attempts = [a for a in Ledger.open(run_dir, read_only=True).projection().attempts if a.epoch > epoch_before]
    except LedgerNotFoundError:
        attempts = []
    if not attempts:
        return LaunchOutcome(EXIT_PREEMPTED, f"{signal_name} before training began; nothing to save")
    last = attempts[-1]
    if last.status == "preempted":
        return LaunchOutcome(EXIT_PREEMPTED, f"preempted by {signal_name}; state saved at step {last.last_step}")
    if last.status == "fenced":
        return LaunchOutcome(EXIT_PROBLEM, f"attempt {last.epoch} was fenced")
    return LaunchOutcome(EXIT_PROBLEM, f"{signal_name} received but attempt {last.epoch} ended '{last.status}' "
                                       "without saving; it will resume from the last committed checkpoint")


def _elastic(config: dict[str, Any], *, nproc: int, max_restarts: int) -> LaunchOutcome:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    apply_single_node_defaults(os.environ)
    if not debug_enabled():
        # The agent logs every worker it starts and stops; the user wants the job's output.
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    run_dir = config["run_dir"]
    epoch_before = _newest_epoch(run_dir)
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"ckpt-ledger-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method=_start_method(),
        signals_to_handle=PREEMPTION_AND_STOP_SIGNALS,
        shutdown_timeout=int(os.environ.get(SHUTDOWN_TIMEOUT_ENV, "600")),
    )
    try:
        results = elastic_launch(launch_config, run_elastic_worker)(config)
    except SignalException as sig:
        return _after_signal(run_dir, epoch_before, sig.sigval.name)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.signal_name() != "<N/A>" else f"exit code {failure.exitcode}"
        restarts = f" after {max_restarts} restart(s)" if max_restarts else ""
        return LaunchOutcome(EXIT_PROBLEM, f"worker rank {rank} failed with {how}{restarts}; "
                                           "the next run resumes from the last committed checkpoint")
    return results[0]
