"""Where the nodes of a multi-node job meet: torch elastic's c10d rendezvous, as one small value.

Every node runs one launcher (``ckpt-ledger train --nnodes N --node-rank R --rdzv-endpoint
HOST:PORT``, or one task per node under ``srun``); each launcher starts ``--nproc`` local
workers, and the launchers agree on the job's global ranks through a TCP store at
``HOST:PORT`` hosted by node 0. Global ranks are handed out by the rendezvous, not by the
node rank; whichever process becomes global rank 0 writes the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Rendezvous id when the user gives none: the endpoint already keeps jobs apart (as torchrun's "none").
DEFAULT_RDZV_ID = "ckpt-ledger"


@dataclass(frozen=True, slots=True)
class NodeRendezvous:
    """This node's place in a multi-node job and where the nodes meet."""

    nnodes: int
    """How many nodes (launchers) the job has; every one must join before training starts."""
    node_rank: int
    """This node's number, 0..nnodes-1; node 0 hosts the rendezvous store."""
    endpoint: str
    """``HOST:PORT`` of the rendezvous store (on node 0), reachable from every node."""
    run_id: str = DEFAULT_RDZV_ID
    """The rendezvous id; every node of one job must use the same one."""
    local_addr: str | None = None
    """The address other nodes reach this node at (default: its fully qualified host name)."""

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"--nnodes {self.nnodes}: must be at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank}: must be in 0..{self.nnodes - 1} "
                             f"for --nnodes {self.nnodes}")
        split_endpoint(self.endpoint)
        if not self.run_id:
            raise ValueError("the rendezvous id must not be empty")

    @property
    def host(self) -> str:
        """The rendezvous host."""
        return split_endpoint(self.endpoint)[0]

    @property
    def port(self) -> int:
        """The rendezvous port."""
        return split_endpoint(self.endpoint)[1]


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) -> (host, port); ``ValueError`` naming what is wrong."""
    host, sep, port_text = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT, e.g. node01:29500")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"--rdzv-endpoint {endpoint!r}: port {port} is not in 1..65535")
    return host, port



def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface."""
    return host in ("localhost", "::1") or host.startswith("127.")
