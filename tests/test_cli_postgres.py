"""The CLI on runs in a PostgreSQL database: same output as a local run, read-only reads, one-line errors."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time

import msgspec
import pytest
from click.testing import CliRunner

from cli.main import cli
from ledger import Ledger
from ledger.events import AttemptStarted, RunStarted, StepCompleted
from runs import build_crashed_run, build_healthy_run, cli_argv, cli_env, run_main

TIME_FIELDS = {"recorded_at", "started_at", "ended_at", "last_seen", "last_event_at"}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def copy_run(run_dir, url: str) -> None:
    """Re-append a local run's log, event by event (same ids and epochs), to a PostgreSQL run whose
    ``run.started`` records the local run directory as its blob store (where the shards are)."""
    with Ledger.open(run_dir, read_only=True) as src, Ledger.open(url) as dst:
        dst.promote_aliases = False  # the source's own alias.promoted events are copied like the rest
        for stored in src.events():
            ev = stored.event
            if isinstance(ev, RunStarted):
                ev = msgspec.structs.replace(ev, blobs=str(run_dir))
            if isinstance(ev, AttemptStarted):
                attempt = dst.begin_attempt(job_id=ev.job_id, slurm=ev.slurm, host=ev.host, pid=ev.pid,
                                            world_size=ev.world_size, stack=ev.stack, topology=ev.topology,
                                            resumed_from=ev.resumed_from)
                assert attempt.epoch == stored.epoch and attempt.seq == stored.seq
            else:
                assert dst.append(ev, epoch=stored.epoch, event_id=stored.event_id) == stored.seq


def without_times(value):
    """``value`` with wall-clock fields (informational only) removed, recursively, and the
    ids begin_attempt mints (the copy cannot choose them), and run.started's blob store."""
    if isinstance(value, dict):
        minted = {"event_id"} if value.get("tag") == "attempt.started" else set()
        minted |= {"blobs"} if value.get("tag") == "run.started" else set()  # the copy records where shards are
        return {k: without_times(v) for k, v in value.items() if k not in TIME_FIELDS | minted}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def next_xid(server) -> int:
    return int(server.sql("postgres", "SELECT pg_snapshot_xmax(pg_current_snapshot())::text")[0][0])


@pytest.mark.parametrize("builder", [build_healthy_run, build_crashed_run])
def test_read_commands_print_the_same_as_for_the_local_run_and_write_nothing(builder, tmp_path, pg_server,
                                                                             pg_run_url):
    info = builder(tmp_path / "run")
    copy_run(info.run_dir, pg_run_url)
    xid = next_xid(pg_server)
    for args in (["inspect", "--json"], ["inspect", "--json", "--at", "7"], ["replay", "--json"],
                 ["replay", "--json", "--kind", "checkpoint.committed"], ["tail", "-n", "4", "--json"]):
        local, remote = invoke(args[0], info.run_dir, *args[1:]), invoke(args[0], pg_run_url, *args[1:])
        assert local.exit_code == 0 and remote.exit_code == 0, remote.output
        parse = (lambda out: json.loads(out) if args[0] == "inspect" else [json.loads(x) for x in out.splitlines()])
        assert without_times(parse(remote.stdout)) == without_times(parse(local.stdout)), args
    text = invoke("inspect", pg_run_url)
    assert text.exit_code == 0 and pg_run_url in text.stdout
    out = tmp_path / "timeline.svg"
    assert invoke("timeline", pg_run_url, "--out", out).exit_code == 0 and out.stat().st_size > 0
    assert next_xid(pg_server) == xid  # no command above wrote anything, anywhere on the server


def test_bad_addresses_exit_2_in_one_line_and_create_nothing(pg_server, pg_database, capsys):
    db = pg_database.rsplit("/", 1)[1]
    pg_server.sql(db, "CREATE TABLE customers (id int)")
    cases = {
        "postgresql://ckpt@127.0.0.1:1/ledger?run=r1": "refused",
        pg_server.url("no_such_db", run="r1"): "does not exist",
        f"{pg_database}?run=r1": "not a ckpt-ledger database",
        pg_server.url("postgres", run="r1"): "no ledger in",
        pg_server.url("postgres", run="r1").replace("ckpt@", "ckpt:hunter2@"): "PGPASSWORD",
        pg_server.url("postgres"): "names no run",
    }
    for url, says in cases.items():
        for command in ("inspect", "replay", "tail", "audit", "export --out model.pt", "timeline --out t.svg"):
            code, out, err = run_main([*command.split()[:1], url, *command.split()[1:]], capsys)
            assert code == 2, (command, url, err)
            assert says in err and len(err.strip().splitlines()) == 1, err
            assert "hunter2" not in err + out
    assert pg_server.sql("postgres", "SELECT count(*) FROM pg_namespace WHERE nspname = 'ckpt_ledger'") == [(0,)]
    assert pg_server.sql(db, "SELECT count(*) FROM pg_namespace WHERE nspname = 'ckpt_ledger'") == [(0,)]


def _reader(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)


@pytest.mark.timeout(120)
def test_tail_follow_prints_what_another_process_appends(pg_run_url):
    with Ledger.open(pg_run_url) as led:
        led.start_run(run_id="r", config={})
    tail = subprocess.Popen(cli_argv("tail", pg_run_url, "--follow", "-n", "1", "--json"), env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(tail.stdout, lines), daemon=True).start()
    try:
        assert json.loads(lines.get(timeout=60))["tag"] == "run.started"
        with Ledger.open(pg_run_url) as led:
            epoch = led.begin_attempt(world_size=1, stack="ddp").epoch
            for step in range(1, 6):
                led.append(StepCompleted(step=step, metrics={"loss": 1.0}), epoch=epoch)
                time.sleep(0.1)
        seen = [json.loads(lines.get(timeout=30)) for _ in range(6)]
        assert [r["seq"] for r in seen] == [2, 3, 4, 5, 6, 7]
        assert [r.get("step") for r in seen[1:]] == [1, 2, 3, 4, 5]
    finally:
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=30) == 0, tail.stderr.read()


def test_runs_lists_every_run_as_inspect_sees_it_and_writes_nothing(tmp_path, pg_server, pg_database, capsys):
    healthy, crashed = build_healthy_run(tmp_path / "healthy"), build_crashed_run(tmp_path / "crashed")
    copy_run(healthy.run_dir, f"{pg_database}?run=healthy")
    copy_run(crashed.run_dir, f"{pg_database}?run=team/crashed")
    with Ledger.open(f"{pg_database}?run=fresh") as led:
        led.start_run(run_id="fresh", config={})
    xid = next_xid(pg_server)
    code, out, err = run_main(["runs", pg_database, "--json"], capsys)
    assert code == 0, err
    listed = json.loads(out)
    assert listed["database"] == pg_database
    assert [r["run"] for r in listed["runs"]] == ["fresh", "healthy", "team/crashed"]
    for row in listed["runs"]:
        code, out, err = run_main(["inspect", row["url"], "--json"], capsys)
        view = json.loads(out)
        assert row["last_step"] == view["last_step"] and row["goodput"] == view["goodput"]
        assert row["resume"] == ({"checkpoint_id": view["resume"]["checkpoint_id"], "step": view["resume"]["step"]}
                                 if view["resume"] else None)
        assert row["status"] == (view["attempts"][-1]["status"] if view["attempts"] else "not started")
        assert row["attempts"] == len(view["attempts"])
    assert listed["runs"][1]["resume"]["checkpoint_id"] == healthy.committed[-1]
    code, out, err = run_main(["runs", pg_database], capsys)
    assert code == 0 and "healthy" in out and healthy.committed[-1] in out and "completed" in out
    code, out, err = run_main(["runs", f"{pg_database}?run=healthy", "--json"], capsys)
    assert [r["run"] for r in json.loads(out)["runs"]] == ["healthy"]
    assert next_xid(pg_server) == xid
    # A run without a current read model (as an older ckpt-ledger leaves it) is folded: same answer.
    db = pg_database.rsplit("/", 1)[1]
    pg_server.sql(db, "DELETE FROM ckpt_ledger.rm_facts WHERE run IN ('healthy', 'team/crashed')")
    code, out, err = run_main(["runs", pg_database, "--json"], capsys)
    assert json.loads(out) == listed


def test_runs_refuses_what_is_not_a_ledger_database(tmp_path, pg_server, pg_database, capsys):
    db = pg_database.rsplit("/", 1)[1]
    code, out, err = run_main(["runs", pg_database], capsys)
    assert code == 2 and "no ledger in" in err and len(err.strip().splitlines()) == 1
    pg_server.sql(db, "CREATE TABLE customers (id int)")
    code, out, err = run_main(["runs", pg_database], capsys)
    assert code == 2 and "not a ckpt-ledger database" in err
    code, out, err = run_main(["runs", str(tmp_path)], capsys)
    assert code == 2 and "not a database URL" in err
    code, out, err = run_main(["runs", pg_database.replace("ckpt@", "ckpt:hunter2@")], capsys)
    assert code == 2 and "PGPASSWORD" in err and "hunter2" not in err
    assert pg_server.sql(db, "SELECT count(*) FROM pg_namespace WHERE nspname = 'ckpt_ledger'") == [(0,)]


def test_pin_gc_and_audit_work_on_a_database_run(tmp_path, pg_server, pg_run_url, capsys):
    info = build_healthy_run(tmp_path / "run")
    copy_run(info.run_dir, pg_run_url)
    xid = next_xid(pg_server)
    local = run_main(["gc", info.run_dir, "--dry-run", "--json", "--keep-last", "2"], capsys)
    remote = run_main(["gc", pg_run_url, "--dry-run", "--json", "--keep-last", "2"], capsys)
    assert remote[0] == local[0] == 0 and json.loads(remote[1]) == json.loads(local[1]), remote
    assert json.loads(remote[1])["checkpoints"], "the plan deletes something: the comparison means something"
    code, out, err = run_main(["audit", pg_run_url, "--verify-blobs", "--json"], capsys)
    assert code == 0 and json.loads(out)["healthy"], out + err  # shards in the recorded --blobs, all verify
    assert next_xid(pg_server) == xid  # dry runs and audits write nothing
    target = info.committed[0]
    code, out, err = run_main(["pin", pg_run_url, target], capsys)
    assert code == 0 and "pinned" in out, err
    with Ledger.open(pg_run_url, read_only=True) as ro:
        assert ro.projection().checkpoint(target).pinned


def test_a_database_run_without_a_blob_store_says_so_in_one_line(pg_run_url, capsys):
    with Ledger.open(pg_run_url) as led:
        led.start_run(run_id="r", config={})
    code, out, err = run_main(["audit", pg_run_url], capsys)
    assert code == 1 and "recorded no blob store" in err and len(err.strip().splitlines()) == 1, err
