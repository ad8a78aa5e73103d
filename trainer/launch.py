"""One entry point for every way a run is started: ``ckpt-ledger train``, ``torchrun -m trainer``, ``srun``.

:func:`plan_launch` decides, from the options and the environment alone:

* Inside an external launcher (torchrun set ``RANK``; or one task per rank of a
  multi-task ``srun`` step), this process *is* a worker: it trains and exits with the
  outcome's code.
* ``--nproc 1`` on one node without restarts trains in this process (a 1-rank gloo group).
* Otherwise torch's elastic agent starts ``nproc`` local workers (``elastic_launch``),
  restarting all of them up to ``--max-restarts`` times after a worker dies; each
  restart is a new attempt that resumes from the ledger's projection, and each restart
  round rendezvouses on a store of its own (:func:`agent_launch_config` says why).
  With ``--nnodes N`` (or one ``srun`` task per node) the agents of N nodes meet at a
  c10d rendezvous and the job has N x nproc ranks (:mod:`trainer.rendezvous`).

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
from typing import TYPE_CHECKING, Any, Mapping, NoReturn

from ledger import CorruptLedgerError, LedgerError, LedgerNotFoundError, SchemaTooNewError
from ledger.errors import LedgerUnavailableError
from trainer.errors import EXIT_PROBLEM, EXIT_USAGE, TrainerError
from trainer.preemption import PREEMPTION_SIGNALS, PreemptionWatch
from trainer.process_group import apply_single_node_defaults, under_srun
from trainer.rendezvous import NodeRendezvous, is_loopback
from trainer.slurm import SlurmStep

if TYPE_CHECKING:
    from torch.distributed.launcher.api import LaunchConfig

#: ``fork`` or ``spawn``: how the elastic agent starts workers (default: fork on CPU-only hosts).
START_METHOD_ENV = "CKPT_LEDGER_START_METHOD"
#: The signals the elastic agent handles (by stopping every worker); preemption signals are ours.
AGENT_STOP_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
#: torch's switch that stops the agent sharing its first-round store with every later round of workers.
NO_SHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
#: How long the agents of a multi-node job wait for every node to join (torchrun's default).
RDZV_JOIN_TIMEOUT_S = 900


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
    except LedgerUnavailableError as err:
        _crash(err)  # the ledger's server went away: a crash (restartable), not the ledger saying no
    except LedgerError as err:
        return LaunchOutcome(_ledger_exit_code(err), str(err).splitlines()[0])
    except Exception as err:
        _crash(err)
    return LaunchOutcome(outcome.exit_code, outcome.message)


def _crash(err: BaseException) -> NoReturn:
    """One line (a traceback with CKPT_LEDGER_DEBUG=1), then die at once.

    Crash-only: a broken process group can block interpreter teardown, and the launcher
    (or the next attempt) recovers from the ledger, not from this process.
    """
    if debug_enabled():
        traceback.print_exception(err)
    print(f"ckpt-ledger: worker rank {os.environ.get('RANK', '?')} crashed: "
          f"{type(err).__name__}: {' '.join(str(err).split())[:300]}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_PROBLEM)


def inside_external_launcher(env: dict[str, str] | os._Environ) -> bool:
    """Whether torchrun (``RANK`` set) or a multi-task ``srun`` already made this process a worker."""
    return "RANK" in env or under_srun(env)


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """How this process takes part in the job."""

    role: str
    """``worker`` (an external launcher started it), ``single`` (trains in this process) or ``agent``."""
    world_size: int
    """Ranks in the whole job (every node)."""
    nodes: NodeRendezvous | None = None
    """Where the agents of a multi-node job meet (``None`` on one node)."""


def plan_launch(env: Mapping[str, str], *, nproc: int = 1, max_restarts: int = 0,
                nodes: NodeRendezvous | None = None) -> LaunchPlan:
    """Decide how to run from the options and the environment; ``ValueError`` names a bad combination.

    Under ``srun`` with several tasks: with ``--nproc 1`` and no restarts each task is one
    rank; otherwise each task is its node's agent (one task per node, :meth:`SlurmStep.node_rendezvous`).
    """
    if "RANK" in env:
        if nodes is not None:
            raise ValueError("--nnodes/--rdzv-endpoint: this process was already started as a worker by "
                             "torchrun (RANK is set); give the multi-node options to torchrun, not to the trainer")
        return LaunchPlan("worker", int(env.get("WORLD_SIZE", "1")))
    step = SlurmStep.from_env(env) if under_srun(env) else None
    if step is not None and nodes is None:
        if nproc == 1 and max_restarts == 0:
            return LaunchPlan("worker", step.ntasks)
        nodes = step.node_rendezvous(env)
    if nodes is not None:
        return LaunchPlan("agent", nodes.nnodes * nproc, nodes)
    if nproc == 1 and max_restarts == 0:
        return LaunchPlan("single", 1)
    return LaunchPlan("agent", nproc)


def launch(config: dict[str, Any], *, nproc: int = 1, max_restarts: int = 0,
           nodes: NodeRendezvous | None = None) -> LaunchOutcome:
    """Run the job: as a worker of an external launcher, in this process, or under the elastic agent."""
    plan = plan_launch(os.environ, nproc=nproc, max_restarts=max_restarts, nodes=nodes)
    if plan.role == "worker":
        warning = shared_store_restart_warning(os.environ)
        if warning and os.environ.get("RANK") == "0":
            print(f"ckpt-ledger: warning: {warning}", file=sys.stderr, flush=True)
        return run_worker(config)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if plan.role == "single":
        return run_worker(config)
    return _elastic(config, nproc=nproc, max_restarts=max_restarts, nodes=plan.nodes)


def shared_store_restart_warning(env: Mapping[str, str]) -> str | None:
    """Why a torchrun ``--max-restarts`` job may hang at its first restart, or ``None``.

    torchrun (unlike ``ckpt-ledger train``) shares its first rendezvous store with every
    restart round unless ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` is exported; a restarted
    round can then read the dead round's gloo addresses and wait forever (pytorch/pytorch#135712;
    reproduced with two torchrun nodes, see docs/scale.md).
    """
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("TORCHELASTIC_MAX_RESTARTS", "0") in ("", "0"):
        return None
    return (f"torchrun --max-restarts shares one store across restart rounds and a restarted round can hang "
            f"(pytorch/pytorch#135712); export {NO_SHARED_STORE_ENV}=1 before torchrun")


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


def agent_launch_config(*, nproc: int, max_restarts: int, nodes: NodeRendezvous | None = None) -> LaunchConfig:
    """The elastic agent's configuration for ``nproc`` local workers; also sets the environment it needs.

    With ``nodes``, this agent is one of ``nodes.nnodes`` that meet at ``nodes.endpoint``; node 0
    hosts the rendezvous store there (said explicitly: the host-name guess fails when every node
    sees the endpoint as its own, as on loopback or behind one name).

    Every restart round gets a store of its own. torch's c10d rendezvous otherwise shares one
    TCPStore, created by the agent at the first round, with the workers of every round, and the
    process group's keys (gloo's listening addresses under ``default_pg/...``) carry no restart
    number: the workers of a new round can read the dead round's addresses before their peers
    overwrite them, and gloo's full mesh is then refused on every retry, or both ends wait to be
    connected to until the timeout (pytorch/pytorch#135712). With sharing off, the agent picks a
    fresh port at each rendezvous round and rank 0 of that round hosts a new, empty store there.
    """
    from torch.distributed.launcher.api import LaunchConfig

    os.environ[NO_SHARED_STORE_ENV] = "1"
    if nodes is not None:
        if is_loopback(nodes.host):
            # gloo picks the interface of the hostname otherwise, which may not route to 127.0.0.1.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        return LaunchConfig(
            min_nodes=nodes.nnodes,
            max_nodes=nodes.nnodes,
            nproc_per_node=nproc,
            run_id=nodes.run_id,
            rdzv_backend="c10d",
            rdzv_endpoint=nodes.endpoint,
            rdzv_configs={"is_host": nodes.node_rank == 0, "timeout": RDZV_JOIN_TIMEOUT_S},
            local_addr=nodes.local_addr,
            max_restarts=max_restarts,
            monitor_interval=0.1,
            start_method=_start_method(),
            signals_to_handle=AGENT_STOP_SIGNALS,
        )
    apply_single_node_defaults(os.environ)
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


def _elastic(config: dict[str, Any], *, nproc: int, max_restarts: int,
             nodes: NodeRendezvous | None = None) -> LaunchOutcome:
    global _FORWARDER
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    launch_config = agent_launch_config(nproc=nproc, max_restarts=max_restarts, nodes=nodes)
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
    except RendezvousError as err:
        # Multi-node only: a node never came, the endpoint is unreachable, or another node gave up.
        where = f" at {nodes.endpoint} ({nodes.nnodes} nodes, this is node {nodes.node_rank})" if nodes else ""
        # torch's own message says "see inner exception"; the inner one's first line says what happened.
        cause = str(err.__cause__).splitlines()[0] if err.__cause__ is not None and str(err.__cause__) else ""
        return LaunchOutcome(EXIT_PROBLEM, f"rendezvous{where} failed: {type(err).__name__}: "
                                           f"{' '.join((cause or str(err)).split())[:300]}; check that every "
                                           "node runs with the same --nnodes and --rdzv-endpoint, and that "
                                           "node 0 is reachable there")
    finally:
        _FORWARDER.uninstall()
    # Keyed by global rank: this node's workers, whose outcomes agree (every rank returns the same).
    return results[min(results)]
