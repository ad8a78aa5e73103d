"""SLURM's description of a job step, mapped onto what torch reads.

``srun`` starts the same command once per task and tells each task who it is through
``SLURM_*`` variables. Two layouts are supported:

* one task per rank (``srun --ntasks-per-node=G ckpt-ledger train``): each task is a
  worker; ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` come from ``SLURM_PROCID``/``SLURM_NTASKS``/
  ``SLURM_LOCALID`` and the process group meets on the step's first node
  (:meth:`SlurmStep.worker_env`);
* one task per node (``srun --ntasks-per-node=1 ckpt-ledger train --nproc G``): each task
  is the elastic agent of its node and the agents meet at a c10d rendezvous on the first
  node (:meth:`SlurmStep.node_rendezvous`), so ``--max-restarts`` works across nodes.

Every task derives the same meeting point from the environment alone (no ``scontrol``,
no talking): the first host of the step's node list and a port computed from the job id.
``MASTER_ADDR``/``MASTER_PORT`` set by the user win.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Mapping

from trainer.rendezvous import NodeRendezvous, is_loopback

LOOPBACK = "127.0.0.1"
#: Ports derived from the job id fall in [BASE_PORT, BASE_PORT + PORT_SPAN): above the usual
#: service ports and below Linux's default ephemeral range (32768+), so that no short-lived
#: client connection is likely to hold it.
BASE_PORT = 20000
PORT_SPAN = 12000
#: A node list expanding to more hosts than this is refused (a typo such as ``n[0-99999999]``).
MAX_HOSTS = 1 << 16

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(hostlist: str) -> list[str]:
    """The host names of a SLURM host list, in order: ``"node[01-03,07],gpu1"`` ->
    ``["node01", "node02", "node03", "node07", "gpu1"]``.

    Commas outside brackets separate entries; inside brackets they separate numbers and
    ``lo-hi`` ranges, zero-padded to the width of ``lo`` as SLURM does. An entry may hold
    several bracket groups (``rack[1-2]-n[1-2]`` expands to their product, leftmost
    slowest). ``ValueError`` names the list and what is wrong with it.
    """
    hosts: list[str] = []
    for entry in _split_top_level(hostlist):
        parts: list[list[str]] = []
        rest = entry
        while rest:
            open_at = rest.find("[")
            if open_at < 0:
                _reject_brackets(hostlist, rest)
                parts.append([rest])
                break
            close_at = rest.find("]", open_at)
            if close_at < 0:
                raise ValueError(f"host list {hostlist!r}: '[' without a matching ']'")
            prefix = rest[:open_at]
            _reject_brackets(hostlist, prefix)
            if prefix:
                parts.append([prefix])
            parts.append(_expand_ranges(hostlist, rest[open_at + 1:close_at]))
            rest = rest[close_at + 1:]
        names = [""]
        for choices in parts:
            names = [name + choice for name in names for choice in choices]
            if len(hosts) + len(names) > MAX_HOSTS:
                raise ValueError(f"host list {hostlist!r}: expands to more than {MAX_HOSTS} hosts")
        hosts.extend(names)
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    entries, depth, start = [], 0, 0
    for i, char in enumerate(hostlist):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"host list {hostlist!r}: nested '[' at position {i}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"host list {hostlist!r}: ']' without a matching '[' at position {i}")
        elif char == "," and depth == 0:
            entries.append(hostlist[start:i])
            start = i + 1
        elif char.isspace():
            raise ValueError(f"host list {hostlist!r}: whitespace at position {i}")
    if depth:
        raise ValueError(f"host list {hostlist!r}: '[' without a matching ']'")
    entries.append(hostlist[start:])
    if hostlist and any(not e for e in entries):
        raise ValueError(f"host list {hostlist!r}: empty entry between commas")
    return [e for e in entries if e]


def _reject_brackets(hostlist: str, text: str) -> None:
    if "]" in text:
        raise ValueError(f"host list {hostlist!r}: ']' without a matching '['")


def _expand_ranges(hostlist: str, ranges: str) -> list[str]:
    out: list[str] = []
    for item in ranges.split(","):
        match = _RANGE.match(item)
        if not match:
            raise ValueError(f"host list {hostlist!r}: {item!r} in brackets is not a number or a lo-hi range")
        lo_text, hi_text = match.groups()
        lo, hi = int(lo_text), int(hi_text if hi_text is not None else lo_text)
        if hi < lo:
            raise ValueError(f"host list {hostlist!r}: range {item!r} runs backwards")
        if hi - lo + 1 > MAX_HOSTS:
            raise ValueError(f"host list {hostlist!r}: range {item!r} has more than {MAX_HOSTS} hosts")
        width = len(lo_text)
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


@dataclass(frozen=True, slots=True)
class SlurmStep:
    """This task's place in its ``srun`` step, read from the environment."""

    job_id: str
    procid: int
    """Global task number (``SLURM_PROCID``)."""
    ntasks: int
    """Tasks in the step (``SLURM_STEP_NUM_TASKS``, else ``SLURM_NTASKS``)."""
    localid: int
    """Task number on this node (``SLURM_LOCALID``)."""
    node_id: int
    """This node's number in the step (``SLURM_NODEID``)."""
    nnodes: int
    """Nodes in the step (``SLURM_STEP_NUM_NODES``, else ``SLURM_NNODES``)."""
    nodes: tuple[str, ...]
    """The step's hosts, expanded (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``); may be empty."""
    restart_count: int
    """How many times SLURM requeued the job (``SLURM_RESTART_COUNT``)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SlurmStep | None:
        """The step this process is a task of, or ``None`` outside one (no ``SLURM_PROCID``)."""
        if "SLURM_PROCID" not in env:
            return None
        nodelist_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                             if env.get(v)), None)
        nodes = tuple(expand_hostlist(env[nodelist_var])) if nodelist_var else ()
        step = cls(
            job_id=env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0",
            procid=_int(env, "SLURM_PROCID"),
            ntasks=_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS", default=1),
            localid=_int(env, "SLURM_LOCALID", default=0),
            node_id=_int(env, "SLURM_NODEID", default=0),
            nnodes=_int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=max(len(nodes), 1)),
            nodes=nodes,
            restart_count=_int(env, "SLURM_RESTART_COUNT", default=0),
        )
        if not 0 <= step.procid < step.ntasks:
            raise ValueError(f"SLURM_PROCID={step.procid} is not below the step's {step.ntasks} task(s)")
        if not 0 <= step.node_id < step.nnodes:
            raise ValueError(f"SLURM_NODEID={step.node_id} is not below the step's {step.nnodes} node(s)")
        if nodes and len(nodes) != step.nnodes:
            raise ValueError(f"{nodelist_var}={env[nodelist_var]!r} names {len(nodes)} host(s) but the step has "
                             f"{step.nnodes} node(s)")
        return step

    def master_host(self, env: Mapping[str, str]) -> str:
        """Where the step's processes meet: ``MASTER_ADDR``, else the first node (loopback on one node)."""
        if env.get("MASTER_ADDR"):
            return env["MASTER_ADDR"]
        if self.nnodes <= 1:
            return LOOPBACK
        if not self.nodes:
            raise ValueError(f"SLURM step of {self.nnodes} nodes without SLURM_JOB_NODELIST: set MASTER_ADDR "
                             "to the first node's address")
        return self.nodes[0]

    def master_port(self, env: Mapping[str, str]) -> int:
        """``MASTER_PORT``, else a port every task derives from the job id alone."""
        if env.get("MASTER_PORT"):
            return _int(env, "MASTER_PORT")
        number = int(self.job_id) if self.job_id.isdigit() else zlib.crc32(self.job_id.encode())
        return BASE_PORT + number % PORT_SPAN

    def worker_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """The variables that make this task one rank of the job (one task per rank)."""
        host = self.master_host(env)
        mapped = {
            "RANK": str(self.procid),
            "WORLD_SIZE": str(self.ntasks),
            "LOCAL_RANK": str(self.localid),
            "GROUP_RANK": str(self.node_id),
            "MASTER_ADDR": host,
            "MASTER_PORT": str(self.master_port(env)),
        }
        if is_loopback(host) and "GLOO_SOCKET_IFNAME" not in env:
            # gloo picks the interface of the hostname otherwise, which may not route to 127.0.0.1.
            mapped["GLOO_SOCKET_IFNAME"] = "lo"
        return mapped

    def node_rendezvous(self, env: Mapping[str, str]) -> NodeRendezvous:
        """This task as the launcher of its node (one task per node), meeting the others on the first node.

        The rendezvous id names the job and its requeue count, so that a task left over from
        an earlier run of a requeued job can never join the new one.
        """
        if self.ntasks != self.nnodes:
            raise ValueError(f"srun started {self.ntasks} tasks on {self.nnodes} node(s): with --nproc > 1 or "
                             "--max-restarts run one task per node (srun --ntasks-per-node=1), or one task per "
                             "rank with --nproc 1")
        host = self.master_host(env)
        endpoint = f"[{host}]:{self.master_port(env)}" if ":" in host else f"{host}:{self.master_port(env)}"
        return NodeRendezvous(nnodes=self.nnodes, node_rank=self.node_id, endpoint=endpoint,
                              run_id=f"slurm-{self.job_id}-r{self.restart_count}")


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for name in names:
        text = env.get(name)
        if text:
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"{name}={text!r} is not an integer") from None
    if default is None:
        raise ValueError(f"{names[0]} is not set")
    return default

