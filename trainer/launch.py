"""One entry point for every way a run is started: ``ckpt-ledger train``, ``torchrun -m trainer``, ``srun``.

* Inside an external launcher (torchrun set ``RANK``; or one task of a multi-task
  ``srun``), this process *is* a worker: it trains and exits with the outcome's code.
* ``--nproc 1`` without restarts trains in this process (a 1-rank gloo group).
* Otherwise torch's elastic agent starts ``nproc`` local workers (``elastic_launch``),
  restarting all of them up to ``--max-restarts`` times after a worker dies; each
  restart is a new attempt that resumes from the ledger's projection, and each restart
  round rendezvouses on a store of its own (:func:`agent_launch_config` says why).

Preemption: the launcher catches SIGTERM/SIGUSR1 itself (the agent only handles
SIGINT/SIGHUP/SIGQUIT, which stop everything) and forwards it to the workers, then keeps
waiting for them like any other run: they checkpoint at the next step boundary and
return "preempted". When the whole process group is signalled (``scancel``) the
workers get it directly too, which is harmless. Workers report preemption, fencing
and refusals as return values rather than exit codes, so the agent never restarts a
preempted or fenced job. When a worker dies, the agent stops the others with SIGTERM
as well; their watch notes it, but stopping takes every rank's agreement at a step
boundary, which a group with a dead rank cannot reach: the survivors crash (exit 1; or
the agent kills them after its 30 s grace) instead of recording a preemption, and the
agent restarts the round.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from ledger import CorruptLedgerError, LedgerError, LedgerNotFoundError, SchemaTooNewError
from trainer.errors import EXIT_PROBLEM, EXIT_USAGE, TrainerError
from trainer.preemption import PREEMPTION_SIGNALS, PreemptionWatch
from trainer.process_group import apply_single_node_defaults, under_srun

if TYPE_CHECKING:
    from torch.distributed.launcher.api import LaunchConfig

#: ``fork`` or ``spawn``: how the elastic agent starts workers (default: fork on CPU-only hosts).
START_METHOD_ENV = "CKPT_LEDGER_START_METHOD"
#: The signals the elastic agent handles (by stopping every worker); preemption signals are ours.
AGENT_STOP_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
#: torch's switch that stops the agent sharing its first-round store with every later round of workers.
NO_SHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


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


def run_worker(config: dict[str, Any], preemption: PreemptionWatch | None = None) -> LaunchOutcome:
    """Train as one rank of the job; every rank returns the same outcome.

    Known refusals (a missing ``--resume`` checkpoint, a fenced attempt, bad input) are
    returned, not raised, so that an elastic agent does not restart them. Anything else
    is a crash: this process exits 1 at once, and the agent may restart the workers.
    """
    own_watch = preemption is None
    preemption = preemption or PreemptionWatch().install()
    try:
        return _train(config, preemption)
    finally:
        if own_watch:
            preemption.uninstall()


def _train(config: dict[str, Any], preemption: PreemptionWatch) -> LaunchOutcome:
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
        trainer = Trainer(cfg, model_fn=model_fn, data_fn=data_fn, loss_fn=loss_fn, preemption=preemption)
        outcome = trainer.fit()
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

    A forked worker inherits the launcher's handlers: the agent's (which turn SIGINT and
    friends into exceptions meant for the agent) are reset; the preemption forwarder's
    flag, if it fired in this process before our own watch was installed, is kept.
    """
    watch = PreemptionWatch().install()
    if _FORWARDER is not None and _FORWARDER.received and watch.received is None:
        watch.received = _FORWARDER.received
    for sig in (signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return run_worker(config, watch)


class SignalForwarder:
    """The launcher's SIGTERM/SIGUSR1 handler: remember the signal and pass it on to every worker.

    Workers that start after the signal (the agent is still rendezvousing, or restarting)
    get it too: a background thread signals each new child once.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._signalled: set[int] = set()
        self._previous: dict[signal.Signals, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def install(self) -> "SignalForwarder":
        """Catch SIGTERM/SIGUSR1 in the launcher (main thread)."""
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Stop forwarding and restore the previous handlers."""
        self._stop.set()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            self._thread = threading.Thread(target=self._keep_forwarding, args=(signum,), daemon=True,
                                            name="ckpt-ledger-signal-forwarder")
            self._thread.start()

    def _keep_forwarding(self, signum: int) -> None:
        while not self._stop.is_set():
            for pid in _worker_pids():
                if pid not in self._signalled:
                    self._signalled.add(pid)
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        pass
            self._stop.wait(0.1)


def _worker_pids() -> list[int]:
    """This process's children, except multiprocessing's resource tracker (Linux ``/proc``)."""
    pids: list[int] = []
    try:
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            pids.extend(int(p) for p in (task / "children").read_text().split())
    except OSError:
        return pids
    workers = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            workers.append(pid)
    return workers


_FORWARDER: SignalForwarder | None = None


def agent_launch_config(*, nproc: int, max_restarts: int) -> LaunchConfig:
    """The elastic agent's configuration for ``nproc`` local workers; also sets the environment it needs.

    Every restart round gets a store of its own. torch's c10d rendezvous otherwise shares one
    TCPStore, created by the agent at the first round, with the workers of every round, and the
    process group's keys (gloo's listening addresses under ``default_pg/...``) carry no restart
    number: the workers of a new round can read the dead round's addresses before their peers
    overwrite them, and gloo's full mesh is then refused on every retry, or both ends wait to be
    connected to until the timeout (pytorch/pytorch#135712). With sharing off, the agent picks a
    fresh port at each rendezvous round and rank 0 of that round hosts a new, empty store there.
    """
    from torch.distributed.launcher.api import LaunchConfig

    apply_single_node_defaults(os.environ)
    os.environ[NO_SHARED_STORE_ENV] = "1"
    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"ckpt-ledger-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method=_start_method(),
        signals_to_handle=AGENT_STOP_SIGNALS,
    )


def _elastic(config: dict[str, Any], *, nproc: int, max_restarts: int) -> LaunchOutcome:
    global _FORWARDER
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    launch_config = agent_launch_config(nproc=nproc, max_restarts=max_restarts)
    if not debug_enabled():
        # The agent logs every worker it starts and stops; the user wants the job's output.
        for name in ("torch.distributed.elastic", "torch.distributed.elastic.agent.server.api",
                     "torch.distributed.elastic.multiprocessing.api"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    _FORWARDER = SignalForwarder().install()
    try:
        results = elastic_launch(launch_config, run_elastic_worker)(config)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.signal_name() != "<N/A>" else f"exit code {failure.exitcode}"
        restarts = f" after {max_restarts} restart(s)" if max_restarts else ""
        return LaunchOutcome(EXIT_PROBLEM, f"worker rank {rank} failed with {how}{restarts}; "
                                           "the next run resumes from the last committed checkpoint")
    finally:
        _FORWARDER.uninstall()
    return results[0]
