"""SLURM's environment -> ranks and rendezvous, from environment fixtures (no scontrol, no cluster)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runs import run_main
from trainer.launch import plan_launch
from trainer.process_group import map_slurm_env, slurm_facts
from trainer.rendezvous import NodeRendezvous, split_endpoint
from trainer.slurm import BASE_PORT, PORT_SPAN, SlurmStep, expand_hostlist

# -- host lists ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hostlist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
    ("gpu[1,3],cpu[001-002]", ["gpu1", "gpu3", "cpu001", "cpu002"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("[1-2]x", ["1x", "2x"]),
    ("node-a.cluster.org,node-b.cluster.org", ["node-a.cluster.org", "node-b.cluster.org"]),
    ("n[5]", ["n5"]),
    ("", []),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist, says", [
    ("n[1-3", "'[' without a matching ']'"),
    ("n1-3]", "']' without a matching '['"),
    ("n[1-2]]", "']' without a matching '['"),
    ("n[[1-2]]", "nested '['"),
    ("n[3-1]", "runs backwards"),
    ("n[a-b]", "'a-b' in brackets is not a number"),
    ("n[1-]", "'1-' in brackets"),
    ("n[]", "'' in brackets"),
    ("n[1,,2]", "'' in brackets"),
    ("a,,b", "empty entry"),
    ("a,", "empty entry"),
    ("n[0-99999999]", "more than"),
    ("n[0-300]-r[0-300]", "more than"),
    ("a, b", "whitespace"),
])
def test_bad_hostlists_are_refused_with_the_reason(hostlist, says):
    with pytest.raises(ValueError, match="host list") as err:
        expand_hostlist(hostlist)
    assert says in str(err.value) and "\n" not in str(err.value)


def _compress(prefix: str, numbers: list[int], width: int) -> str:
    """The SLURM form of ``prefix`` + numbers: runs of consecutive numbers become lo-hi ranges."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    parts = [f"{r[0]:0{width}d}" if len(r) == 1 else f"{r[0]:0{width}d}-{r[-1]:0{width}d}" for r in runs]
    return f"{prefix}[{','.join(parts)}]"


@given(groups=st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True),
                                 st.lists(st.integers(0, 400), min_size=1, max_size=30, unique=True),
                                 st.integers(1, 4)), min_size=1, max_size=4))
def test_compressed_hostlists_expand_to_the_hosts_they_name(groups):
    text, expected = [], []
    for prefix, numbers, width in groups:
        numbers = sorted(numbers)
        text.append(_compress(prefix, numbers, width))
        expected.extend(f"{prefix}{n:0{width}d}" for n in numbers)
    assert expand_hostlist(",".join(text)) == expected


# -- a task of an srun step ---------------------------------------------------------------------

def _task(procid: int, *, ntasks: int, nnodes: int, nodelist: str, node_id: int, localid: int = 0,
          job: str = "81234", **extra: str) -> dict[str, str]:
    """The variables srun gives one task (plus whatever the user's environment has)."""
    env = {"SLURM_JOB_ID": job, "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks),
           "SLURM_NNODES": str(nnodes), "SLURM_JOB_NODELIST": nodelist, "SLURM_NODEID": str(node_id),
           "SLURM_LOCALID": str(localid), "SLURM_JOB_NAME": "train"}
    env.update(extra)
    return env


def test_one_task_per_rank_on_two_nodes_maps_to_torch_ranks():
    # srun --nodes 2 --ntasks-per-node 2: tasks 0,1 on gpu07, tasks 2,3 on gpu09.
    envs = [_task(p, ntasks=4, nnodes=2, nodelist="gpu[07,09]", node_id=p // 2, localid=p % 2) for p in range(4)]
    for env in envs:
        map_slurm_env(env)
    assert [(e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["GROUP_RANK"]) for e in envs] == [
        ("0", "4", "0", "0"), ("1", "4", "1", "0"), ("2", "4", "0", "1"), ("3", "4", "1", "1")]
    # Every task meets on the first node at the same port, derived from the job id alone.
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("gpu07", str(BASE_PORT + 81234 % PORT_SPAN))}
    assert all("GLOO_SOCKET_IFNAME" not in e for e in envs)  # a real network: gloo picks the interface
    assert plan_launch(envs[0]).role == "worker"


def test_one_task_per_node_becomes_that_nodes_agent():
    # srun --nodes 3 --ntasks-per-node 1 ckpt-ledger train --nproc 4, requeued twice.
    envs = [_task(n, ntasks=3, nnodes=3, nodelist="node[01-02,07]", node_id=n, SLURM_RESTART_COUNT="2")
            for n in range(3)]
    plans = [plan_launch(env, nproc=4) for env in envs]
    assert {p.role for p in plans} == {"agent"} and {p.world_size for p in plans} == {12}
    port = BASE_PORT + 81234 % PORT_SPAN
    assert [p.nodes for p in plans] == [
        NodeRendezvous(nnodes=3, node_rank=n, endpoint=f"node01:{port}", run_id="slurm-81234-r2") for n in range(3)]
    # A requeued run rendezvouses under a new id: a leftover task of the previous run cannot join it.
    requeued = plan_launch({**envs[0], "SLURM_RESTART_COUNT": "3"}, nproc=4)
    assert requeued.nodes.run_id == "slurm-81234-r3"
    # --max-restarts needs an agent even with one process per node.
    assert plan_launch(envs[1], nproc=1, max_restarts=2).nodes.node_rank == 1


def test_the_steps_own_node_list_wins_over_the_jobs():
    # A 2-node step inside a 4-node allocation: the step's first node hosts, not the job's.
    env = _task(1, ntasks=2, nnodes=2, nodelist="node[01-04]", node_id=1,
                SLURM_STEP_NODELIST="node[03-04]", SLURM_STEP_NUM_NODES="2", SLURM_STEP_NUM_TASKS="2")
    assert plan_launch(env, nproc=2).nodes.host == "node03"
    step = SlurmStep.from_env(env)
    assert step.nodes == ("node03", "node04") and step.nnodes == 2


def test_master_addr_and_port_set_by_the_user_win():
    env = _task(1, ntasks=2, nnodes=2, nodelist="node[01-02]", node_id=1, MASTER_ADDR="10.0.0.5", MASTER_PORT="29555")
    assert split_endpoint(plan_launch(env, nproc=2).nodes.endpoint) == ("10.0.0.5", 29555)
    map_slurm_env(env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.5", "29555")


def test_ipv6_master_is_bracketed_in_the_endpoint():
    env = _task(0, ntasks=2, nnodes=2, nodelist="n[1-2]", node_id=0, MASTER_ADDR="fd00::5")
    nodes = plan_launch(env, nproc=2).nodes
    assert nodes.endpoint.startswith("[fd00::5]:") and nodes.host == "fd00::5"


def test_single_node_step_meets_on_loopback():
    env = _task(1, ntasks=2, nnodes=1, nodelist="node05", node_id=0, localid=1)
    map_slurm_env(env)
    assert (env["MASTER_ADDR"], env["GLOO_SOCKET_IFNAME"]) == ("127.0.0.1", "lo")


def test_non_numeric_job_ids_still_give_every_task_the_same_port():
    ports = {SlurmStep.from_env(_task(p, ntasks=2, nnodes=2, nodelist="n[1-2]", node_id=p, job="77_3")).master_port({})
             for p in range(2)}
    assert len(ports) == 1 and BASE_PORT <= ports.pop() < BASE_PORT + PORT_SPAN


def test_outside_srun_the_plan_ignores_the_allocation():
    # The batch script of a 2-node job (no srun): SLURM_NTASKS=1, a plain single-node run.
    env = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "n[1-2]"}
    assert plan_launch(env) == plan_launch({}) and plan_launch({}).role == "single"
    assert plan_launch(env, nproc=2).nodes is None
    assert SlurmStep.from_env({"SLURM_JOB_ID": "9"}) is None


def test_torchrun_workers_and_explicit_nodes():
    worker = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert plan_launch(worker, nproc=8).world_size == 4  # torchrun decides; srun's task count is not ours
    nodes = NodeRendezvous(nnodes=2, node_rank=1, endpoint="127.0.0.1:29400")
    assert plan_launch({}, nproc=3, nodes=nodes).world_size == 6
    with pytest.raises(ValueError, match="already started as a worker by torchrun"):
        plan_launch(worker, nodes=nodes)


@pytest.mark.parametrize("env, says", [
    (_task(2, ntasks=2, nnodes=2, nodelist="n[1-2]", node_id=1), "SLURM_PROCID=2 is not below the step's 2 task"),
    (_task(1, ntasks=2, nnodes=2, nodelist="n[1-2]", node_id=2), "SLURM_NODEID=2 is not below the step's 2 node"),
    (_task(1, ntasks=2, nnodes=2, nodelist="n[1-3]", node_id=1), "names 3 host(s) but the step has 2 node(s)"),
    (_task(1, ntasks="two", nnodes=2, nodelist="n[1-2]", node_id=1), "SLURM_NTASKS='two' is not an integer"),
    (_task(1, ntasks=2, nnodes=2, nodelist="n[1-2", node_id=1), "host list 'n[1-2'"),
    (_task(1, ntasks=2, nnodes=2, nodelist="", node_id=1), "without SLURM_JOB_NODELIST: set MASTER_ADDR"),
    (_task(3, ntasks=4, nnodes=2, nodelist="n[1-2]", node_id=1), "srun started 4 tasks on 2 node(s)"),
])
def test_inconsistent_slurm_environments_are_refused(env, says):
    with pytest.raises(ValueError) as err:
        plan_launch(env, nproc=2)
    assert says in str(err.value)


def test_slurm_facts_record_the_allocation():
    facts = slurm_facts(_task(0, ntasks=2, nnodes=2, nodelist="n[1-2]", node_id=0, SLURM_RESTART_COUNT="4"))
    assert facts["job_id"] == "81234" and facts["restart_count"] == 4
    assert facts["nodelist"] == "n[1-2]" and facts["nnodes"] == 2


# -- the CLI refuses bad multi-node options before starting anything ------------------------------


@pytest.mark.parametrize("args, says", [
    (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "n1:29400"], "--node-rank 2: must be in 0..1"),
    (["--nnodes", "2", "--rdzv-endpoint", "n1"], "--rdzv-endpoint 'n1': expected HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "n1:70000"], "port 70000 is not in 1..65535"),
    (["--node-rank", "1"], "need --nnodes N --rdzv-endpoint"),
    (["--nnodes", "2", "--rdzv-endpoint", "n1:29400", "--stack", "tppp", "--tp", "3"], "--tp 3 --pp 1"),
])
def test_bad_multinode_options_exit_2_with_one_line(tmp_path, capsys, args, says):
    code, out, err = run_main(["train", "--run-dir", tmp_path / "run", *args], capsys)
    assert code == 2, err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_cli_refuses_srun_with_several_tasks_per_node_and_nproc(tmp_path, capsys, monkeypatch):
    for name, value in _task(1, ntasks=4, nnodes=2, nodelist="n[1-2]", node_id=0, localid=1).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RANK", raising=False)
    code, _, err = run_main(["train", "--run-dir", tmp_path / "run", "--nproc", "2"], capsys)
    assert code == 2 and "srun started 4 tasks on 2 node(s)" in err and "--ntasks-per-node=1" in err
    assert not (tmp_path / "run").exists()


def test_torchrun_restarts_on_a_shared_store_are_warned_about():
    from trainer.launch import shared_store_restart_warning

    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "2"}
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in shared_store_restart_warning(shared)
    assert shared_store_restart_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert shared_store_restart_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert shared_store_restart_warning({}) is None
