"""``ckpt-ledger inspect``: the human tables and the contract's JSON fields."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import cli
from ledger import Ledger
from runs import build_crashed_run, build_healthy_run


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def healthy(tmp_path):
    return build_healthy_run(tmp_path / "run", keep_last=3)


def test_json_has_every_contract_field(healthy):
    result = invoke("inspect", healthy.run_dir, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["run_id"] == "run"
    assert data["latest"] == {"checkpoint_id": healthy.committed[-1], "step": 50}
    assert data["resume"] == {"checkpoint_id": healthy.committed[-1], "step": 50}
    assert data["best"] == {"checkpoint_id": healthy.committed[3], "step": 40, "metric": "eval_loss", "value": 1.1}
    assert data["last_step"] == 50
    # Attempt 1 ran to step 33 and was resumed from step 30: 3 of 53 executed steps were lost.
    assert data["goodput"] == pytest.approx(50 / 53)
    assert [a["status"] for a in data["attempts"]] == ["preempted", "completed"]
    for attempt in data["attempts"]:
        assert {"epoch", "status", "reason", "started_at", "ended_at", "resumed_from", "last_step", "job_id"} <= set(attempt)
    assert data["attempts"][1]["resumed_from"] == healthy.committed[2]
    assert data["attempts"][0]["job_id"] == "1001" and data["attempts"][0]["last_step"] == 33
    assert len(data["checkpoints"]) == 5
    for ckpt in data["checkpoints"]:
        assert {"checkpoint_id", "step", "status", "bytes", "shards", "world_size", "stack"} <= set(ckpt)
        assert ckpt["status"] == "committed" and ckpt["shards"] == 2 and ckpt["bytes"] == 512 and ckpt["world_size"] == 2


def test_human_view_tables(healthy):
    result = invoke("inspect", healthy.run_dir)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"resume  {healthy.committed[-1]} (step 50)" in out
    assert f"best    {healthy.committed[3]} (step 40)  eval_loss=1.1 (min)" in out
    assert "goodput 94.3% (3 of 53 steps lost to restarts)" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:3] == ["epoch", "job", "status"])
    for column in ("reason", "resumed from", "last step", "steps lost", "duration"):
        assert column in header
    preempted = next(line for line in lines if " preempted " in line)
    assert "preempted (SIGTERM)" in preempted and "1001" in preempted
    ck_header = next(line for line in lines if line.strip().startswith("checkpoint "))
    for column in ("step", "status", "size", "shards", "topology", "eval_loss", "kept because"):
        assert column in ck_header
    # Columns line up: every checkpoint row puts its step under the header's "step".
    rows = [line for line in lines if line.strip().startswith("step0000")]
    assert len(rows) == 5
    step_end = ck_header.index("step") + len("step")
    assert all(row[step_end - 2:step_end] in {"10", "20", "30", "40", "50"} for row in rows)
    assert "dp2·pp1·tp1" in rows[0] and "resume target" in rows[-1]


def test_at_seq_is_time_travel(healthy):
    events = Ledger.open(healthy.run_dir, read_only=True).events(tags=["checkpoint.committed"])
    first_commit = events[0].seq
    data = json.loads(invoke("inspect", healthy.run_dir, "--json", "--at", first_commit).stdout)
    assert data["seq"] == first_commit
    assert data["latest"]["checkpoint_id"] == healthy.committed[0]
    assert [a["status"] for a in data["attempts"]] == ["running"]
    before = json.loads(invoke("inspect", healthy.run_dir, "--json", "--at", first_commit - 1).stdout)
    assert before["latest"] is None


def test_crashed_run_shows_torn_save_and_crash(tmp_path):
    info = build_crashed_run(tmp_path / "run")
    result = invoke("inspect", info.run_dir)
    assert result.exit_code == 0
    torn_row = next(line for line in result.stdout.splitlines() if line.strip().startswith(info.torn[0]))
    assert " torn " in torn_row
    crashed_row = next(line for line in result.stdout.splitlines() if " crashed " in line)
    assert "no attempt.ended" in crashed_row and "≥" in crashed_row
    data = json.loads(invoke("inspect", info.run_dir, "--json").stdout)
    statuses = {c["checkpoint_id"]: c["status"] for c in data["checkpoints"]}
    assert statuses[info.torn[0]] == "in_flight" and statuses[info.aborted[0]] == "aborted"
    crashed = data["attempts"][0]
    assert crashed["status"] == "crashed" and crashed["ended_at"] is None
    assert crashed["last_event_at"] >= crashed["started_at"]


def test_empty_ledger_is_not_an_error(tmp_path):
    Ledger.open(tmp_path / "run").close()
    result = invoke("inspect", tmp_path / "run")
    assert result.exit_code == 0 and "(not started)" in result.stdout
    data = json.loads(invoke("inspect", tmp_path / "run", "--json").stdout)
    assert data["run_id"] is None and data["attempts"] == [] and data["resume"] is None and data["goodput"] == 1.0
