"""Two-node jobs on one machine: two launchers (torchrun, ``ckpt-ledger train --nnodes``, or srun-style
tasks) meet at a c10d rendezvous on loopback, each with its own workers, sharing one run directory.

The run resumes anywhere: on two nodes, on one node with ``--nproc 2``, and back, ending bitwise where
an uninterrupted single-node run ends (same world size, same seed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.process_group import free_port
from trainer_support import (
    QUICK,
    REPO,
    assert_bitwise_equal,
    cli_env,
    committed_steps,
    events_of,
    export_state,
    finish,
    kill_group,
    reference_run,
    run_cli,
    view_of,
    wait_for,
)

pytestmark = [pytest.mark.multiprocess]

#: Every worker SIGKILLs itself when it is global rank 1 writing its second checkpoint's shards.
KILL_RANK1_AT_SECOND_SAVE = "trainer.rank1.after_shard_write:2"


def torchrun_node(run_dir: Path, node_rank: int, port: int, *extra: str, nnodes: int = 2,
                  env: dict[str, str] | None = None) -> subprocess.Popen:
    """One node's ``torchrun --nnodes 2 --nproc-per-node 1 ... -m trainer`` (the user's command line)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", "1",
           "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", "mn-test", *extra, "-m", "trainer", "--run-dir", str(run_dir), *QUICK]
    return subprocess.Popen(cmd, cwd=REPO, env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def cli_node(run_dir: Path, node_rank: int, port: int, *extra: str, env: dict[str, str] | None = None
             ) -> subprocess.Popen:
    """One node's ``ckpt-ledger train --nnodes 2 --node-rank R --rdzv-endpoint 127.0.0.1:PORT``."""
    cmd = [sys.executable, "-m", "cli", "train", "--run-dir", str(run_dir), "--nnodes", "2", "--node-rank",
           str(node_rank), "--rdzv-endpoint", f"127.0.0.1:{port}", *QUICK, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Wait for every node; on a hang kill them all (never leave a node behind)."""
    try:
        return [finish(p, timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p, signal.SIGKILL)
                p.communicate()


@pytest.mark.timeout(900)
def test_two_nodes_then_one_node_then_two_nodes_is_bitwise_identical(tmp_path, tmp_path_factory):
    _, reference = reference_run(tmp_path_factory, "ddp")
    run_dir = tmp_path / "run"

    # 1. Two torchrun agents on loopback, one worker each. Global rank 1 dies while saving the second
    #    checkpoint (step 20): step 10 is committed, step 20 never is, and without restarts both nodes stop.
    crash = cli_env(CKPT_LEDGER_CRASH_AT=KILL_RANK1_AT_SECOND_SAVE)
    port = free_port()
    first = finish_all([torchrun_node(run_dir, rank, port, env=crash) for rank in (0, 1)])
    assert all(r.returncode != 0 for r in first), [r.stderr[-2000:] for r in first]
    assert committed_steps(run_dir) == [10]
    view = view_of(run_dir)
    [attempt] = view.attempts
    assert attempt.world_size == 2 and attempt.job_id == "mn-test"
    # Never committed: left in flight, or aborted by rank 0 when it saw its peer gone.
    assert [c.status for c in view.checkpoints.values() if c.step == 20] in (["in_flight"], ["aborted"])

    # 2. The same run on one node with two local workers: it resumes from step 10 (not the torn 20),
    #    commits 20, and rank 1 dies again at its second save (step 30).
    second = run_cli("train", "--run-dir", str(run_dir), "--nproc", "2", *QUICK, env=crash, timeout=300)
    assert second.returncode == 1, second.stderr
    view = view_of(run_dir)
    assert view.attempts[-1].first_step == 10 and view.checkpoints[view.attempts[-1].resumed_from].step == 10
    assert committed_steps(run_dir) == [10, 20]

    # 3. Back on two nodes, through ckpt-ledger's own multi-node launcher: resumes from 20, finishes.
    port = free_port()
    third = finish_all([cli_node(run_dir, rank, port) for rank in (0, 1)])
    assert [r.returncode for r in third] == [0, 0], [r.stderr[-2000:] for r in third]
    view = view_of(run_dir)
    assert [a.world_size for a in view.attempts] == [2, 2, 2]
    assert view.checkpoints[view.attempts[-1].resumed_from].step == 20
    assert view.attempts[-1].status == "completed" and committed_steps(run_dir) == [10, 20, 30]
    assert view.attempts[-1].job_id == "ckpt-ledger"  # the rendezvous id (torchrun's --rdzv-id in step 1)

    assert_bitwise_equal(reference, export_state(run_dir, tmp_path / "final.pt"))


@pytest.mark.timeout(600)
def test_a_killed_node_recovers_under_max_restarts_on_both_agents(tmp_path, tmp_path_factory, crash_counter):
    _, reference = reference_run(tmp_path_factory, "ddp")
    run_dir = tmp_path / "run"
    port = free_port()
    # torchrun shares one store with every restart round unless told not to (see docs/scale.md).
    # Node 1's worker (rank 1) SIGKILLs itself after step 25, once (the marker file); both agents restart theirs.
    marker = tmp_path / "crashed"
    env = cli_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", CKPT_LEDGER_CRASH_AT="trainer.rank1.after_step:25",
                  CKPT_LEDGER_CRASH_ONCE=str(marker))
    nodes = [torchrun_node(run_dir, rank, port, "--max-restarts", "2", env=env) for rank in (0, 1)]
    done = finish_all(nodes, timeout=400)
    assert [r.returncode for r in done] == [0, 0], [r.stderr[-3000:] for r in done]
    assert marker.exists(), "rank 1 never reached its crash point"
    crash_counter("trainer.worker_sigkill")

    view = view_of(run_dir)
    first, second = view.attempts
    assert first.status in ("failed", "crashed") and first.last_step < 30, "the run finished before the kill"
    assert second.status == "completed" and second.world_size == 2
    assert view.checkpoints[second.resumed_from].epoch == first.epoch
    assert not events_of(run_dir, "preemption.signalled")
    assert_bitwise_equal(reference, export_state(run_dir, tmp_path / "final.pt"))


def _free_port_in(first: int, count: int) -> int:
    """A port in [first, first+count) that was free a moment ago."""
    import socket

    for port in range(first, first + count):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {first}..{first + count - 1}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_srun_one_task_per_node_agents_recover_a_killed_worker(tmp_path, tmp_path_factory, crash_counter):
    """Two tasks started the way ``srun --nodes 2 --ntasks-per-node 1 python -m trainer --max-restarts 1``
    starts them: only SLURM_* says who is who, and where to meet (the node list's first host, a port
    derived from the job id); then one node's worker is SIGKILLed and both agents restart theirs."""
    from trainer.slurm import BASE_PORT, PORT_SPAN

    _, reference = reference_run(tmp_path_factory, "ddp")
    run_dir = tmp_path / "run"
    job_id = _free_port_in(BASE_PORT, PORT_SPAN) - BASE_PORT

    marker = tmp_path / "crashed"  # node 1's worker SIGKILLs itself after step 25, in the first round only

    def task(node: int) -> subprocess.Popen:
        env = cli_env(SLURM_JOB_ID=str(job_id), SLURM_PROCID=str(node), SLURM_NTASKS=str(2), SLURM_NNODES="2",
                      SLURM_NODEID=str(node), SLURM_LOCALID="0", SLURM_JOB_NODELIST="127.0.0.[1-2]",
                      CKPT_LEDGER_CRASH_AT="trainer.rank1.after_step:25", CKPT_LEDGER_CRASH_ONCE=str(marker))
        del env["MASTER_ADDR"]  # the first host of the node list is the meeting point
        return subprocess.Popen([sys.executable, "-m", "trainer", "--run-dir", str(run_dir), "--max-restarts", "1",
                                 *QUICK], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    done = finish_all([task(node) for node in (0, 1)], timeout=400)
    assert [r.returncode for r in done] == [0, 0], [r.stderr[-3000:] for r in done]
    assert marker.exists(), "rank 1 never reached its crash point"
    crash_counter("trainer.worker_sigkill")
    first, second = view_of(run_dir).attempts
    assert first.status in ("failed", "crashed") and first.last_step < 30, "the run finished before the kill"
    assert second.status == "completed" and second.world_size == 2
    assert second.job_id == str(job_id) and second.slurm["nnodes"] == 2
    assert_bitwise_equal(reference, export_state(run_dir, tmp_path / "final.pt"))


# -- two nodes that share no loopback: network namespaces joined by a veth pair -------------------


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_netns():
    """Two network namespaces, each with its own loopback and one end of a veth pair (10.231.N.1 / .2).

    Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2; skipped with the reason otherwise.
    """
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = f"{os.getpid() % 100000}"
    names, subnet = [f"ckl{tag}n0", f"ckl{tag}n1"], f"10.231.{os.getpid() % 250}"
    try:
        made = _ip("netns", "add", names[0])
    except FileNotFoundError:
        pytest.skip("iproute2 (ip) is not installed")
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        steps = [("netns", "add", names[1]),
                 ("link", "add", f"ckl{tag}a", "type", "veth", "peer", "name", f"ckl{tag}b"),
                 ("link", "set", f"ckl{tag}a", "netns", names[0]),
                 ("link", "set", f"ckl{tag}b", "netns", names[1])]
        for node, end in ((0, "a"), (1, "b")):
            steps += [("-n", names[node], "link", "set", f"ckl{tag}{end}", "name", "mn0"),
                      ("-n", names[node], "addr", "add", f"{subnet}.{node + 1}/24", "dev", "mn0"),
                      ("-n", names[node], "link", "set", "mn0", "up"),
                      ("-n", names[node], "link", "set", "lo", "up")]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot set up the veth pair here (ip {' '.join(step)}): {done.stderr.strip()}")
        yield names, [f"{subnet}.1", f"{subnet}.2"]
    finally:
        for name in names:
            _ip("netns", "del", name)  # also removes the veth end inside it


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_nodes_in_separate_network_namespaces(tmp_path, tmp_path_factory, two_netns):
    """Each node in a network namespace of its own (no shared loopback; they talk over the veth pair only),
    with the run directory on the file system they share: torchrun nodes train and commit, then
    ckpt-ledger's own nodes resume the run and finish it bitwise-exactly."""
    _, reference = reference_run(tmp_path_factory, "ddp")
    (ns0, ns1), (addr0, addr1) = two_netns
    listing = subprocess.run(["ip", "netns", "exec", ns1, "ip", "-br", "addr"], capture_output=True, text=True)
    assert sorted(line.split()[0].split("@")[0] for line in listing.stdout.splitlines()) == ["lo", "mn0"]
    run_dir = tmp_path / "run"
    env = cli_env(GLOO_SOCKET_IFNAME="mn0")
    del env["MASTER_ADDR"]
    endpoint = f"{addr0}:29400"  # each namespace has its own port space: the port is free in both

    # 1. torchrun: its host-name guess cannot tell that 10.231.N.1 is node 0's own address inside a
    #    namespace, so node 0 is told (--rdzv-conf is_host); global rank 1 dies at its second save.
    nodes = []
    for rank, (ns, addr) in enumerate(((ns0, addr0), (ns1, addr1))):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint",
               endpoint, "--rdzv-conf", f"is_host={rank == 0}", "--rdzv-id", "netns", "--local-addr", addr,
               "-m", "trainer", "--run-dir", str(run_dir), *QUICK]
        nodes.append(subprocess.Popen(cmd, cwd=REPO, env={**env, "CKPT_LEDGER_CRASH_AT": KILL_RANK1_AT_SECOND_SAVE},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    done = finish_all(nodes, timeout=400)
    assert (run_dir / "ledger.db").exists(), [r.stderr[-3000:] for r in done]
    assert all(r.returncode != 0 for r in done) and committed_steps(run_dir) == [10], [r.stderr[-2000:] for r in done]

    # 2. ckpt-ledger train --nnodes 2 in the same namespaces (node 0 hosts the rendezvous by --node-rank).
    nodes = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "cli", "train", "--run-dir",
                               str(run_dir), "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", endpoint,
                               "--local-addr", addr, *QUICK], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
             for rank, (ns, addr) in enumerate(((ns0, addr0), (ns1, addr1)))]
    done = finish_all(nodes, timeout=400)
    assert [r.returncode for r in done] == [0, 0], [r.stderr[-3000:] for r in done]
    view = view_of(run_dir)
    assert [a.world_size for a in view.attempts] == [2, 2] and view.attempts[-1].first_step == 10
    assert_bitwise_equal(reference, export_state(run_dir, tmp_path / "final.pt"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_node_whose_rendezvous_never_answers_fails_with_one_line(tmp_path):
    """Node 1 started alone (node 0 never comes): torch's client gives up after its connect retries
    (about two minutes, mostly asleep); the launcher exits 1 saying where it tried to meet, and
    nothing is created in the run directory."""
    run_dir = tmp_path / "run"
    port = free_port()
    done = finish(cli_node(run_dir, 1, port), timeout=360)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ckpt-ledger: error: rendezvous at 127.0.0.1:{port} (2 nodes, this is node 1) failed"), last
    assert "timed out" in last and "same --nnodes and --rdzv-endpoint" in last
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_preempting_every_node_checkpoints_and_exits_75(tmp_path, tmp_path_factory):
    """SIGTERM to every node's whole process group (as scancel and SLURM's --signal send it): the job
    stops at a step boundary agreed by all ranks, checkpoints, and every node exits 75; a requeue on
    one node finishes bitwise-exactly."""
    _, reference = reference_run(tmp_path_factory, "ddp")
    run_dir = tmp_path / "run"
    port = free_port()
    nodes = [cli_node(run_dir, rank, port) for rank in (0, 1)]
    try:
        wait_for(lambda: bool(committed_steps(run_dir)), timeout=300, proc=nodes[0], what="the first commit")
        for node in nodes:
            kill_group(node, signal.SIGTERM)
    finally:
        done = finish_all(nodes, timeout=300)
    assert [r.returncode for r in done] == [75, 75], [r.stderr[-2000:] for r in done]
    view = view_of(run_dir)
    [attempt] = view.attempts
    assert attempt.status == "preempted" and attempt.last_step < 30, "the run finished before the signal"
    [signalled] = events_of(run_dir, "preemption.signalled")
    assert signalled.event.signal == "SIGTERM" and view.resume.step == signalled.event.step == attempt.last_step

    requeued = run_cli("train", "--run-dir", str(run_dir), "--nproc", "2", *QUICK, timeout=300)
    assert requeued.returncode == 0, requeued.stderr
    assert view_of(run_dir).attempts[-1].first_step == attempt.last_step
    assert_bitwise_equal(reference, export_state(run_dir, tmp_path / "final.pt"))


def test_each_node_agent_is_configured_for_the_shared_rendezvous(monkeypatch):
    """What ckpt-ledger's launcher hands torch's elastic agent on each node (no process started)."""
    from trainer.launch import NO_SHARED_STORE_ENV, agent_launch_config
    from trainer.rendezvous import NodeRendezvous

    for name in (NO_SHARED_STORE_ENV, "GLOO_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    configs = [agent_launch_config(nproc=4, max_restarts=3, nodes=NodeRendezvous(
        nnodes=2, node_rank=rank, endpoint="node01:29500", run_id="exp1", local_addr=f"10.0.0.{rank + 1}"))
        for rank in (0, 1)]
    for rank, cfg in enumerate(configs):
        assert (cfg.min_nodes, cfg.max_nodes, cfg.nproc_per_node, cfg.max_restarts) == (2, 2, 4, 3)
        assert (cfg.rdzv_backend, cfg.rdzv_endpoint, cfg.run_id) == ("c10d", "node01:29500", "exp1")
        assert cfg.rdzv_configs["is_host"] is (rank == 0) and cfg.local_addr == f"10.0.0.{rank + 1}"
    assert os.environ[NO_SHARED_STORE_ENV] == "1"  # a fresh store per restart round (pytorch#135712)
    assert "GLOO_SOCKET_IFNAME" not in os.environ and "MASTER_ADDR" not in os.environ  # a real network
    agent_launch_config(nproc=1, max_restarts=0, nodes=NodeRendezvous(nnodes=2, node_rank=1,
                                                                      endpoint="127.0.0.1:29500"))
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"  # loopback meeting point: gloo must bind lo
