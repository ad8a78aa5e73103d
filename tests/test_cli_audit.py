"""``ckpt-ledger audit``: post-mortem findings, exit codes, and never a changed byte."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import cli
from ledger import Ledger
from ledger.audit import audit
from ledger.events import AttemptEnded, ShardWritten
from runs import build_crashed_run, build_healthy_run, cid_for, run_killed_writer, snapshot_tree


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def audit_json(run_dir, *extra):
    result = invoke("audit", run_dir, "--json", *extra)
    data = json.loads(result.stdout)
    return result.exit_code, data


def kinds(data, severity="problem"):
    return sorted(f["kind"] for f in data["findings"] if f["severity"] == severity)


def test_healthy_run_exits_zero(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    before = snapshot_tree(info.run_dir)
    result = invoke("audit", info.run_dir, "--verify-blobs")
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith("healthy")
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    code, data = audit_json(info.run_dir, "--verify-blobs")
    assert code == 0 and data["healthy"] and data["problems"] == 0
    assert data["checked"]["shards"] == 10 and data["checked"]["bytes_hashed"] == 10 * 256
    assert snapshot_tree(info.run_dir) == before


def test_abandoned_writer_then_gc_makes_it_clean(tmp_path):
    info = build_crashed_run(tmp_path / "run")
    before = snapshot_tree(info.run_dir)
    code, data = audit_json(info.run_dir)
    assert code == 1
    assert kinds(data) == ["aborted_files", "stray_file", "stray_file", "torn_checkpoint"]
    by_kind = {f["kind"]: f for f in data["findings"]}
    crash = by_kind["crashed_attempt"]
    assert crash["subject"] == "attempt 1" and "shard.written" in crash["message"]
    assert "rank 0: shard recorded; rank 1: nothing recorded" in crash["message"]
    assert by_kind["torn_checkpoint"]["subject"] == info.torn[0]
    strays = sorted(f["subject"] for f in data["findings"] if f["kind"] == "stray_file")
    assert strays == sorted(p.relative_to(info.run_dir).as_posix() for p in info.stray_files)
    assert all(f["fix"] and "gc" in f["fix"] for f in data["findings"] if f["severity"] == "problem")
    human = invoke("audit", info.run_dir)
    assert human.exit_code == 1 and human.stdout.count("fix: ") == 4
    assert snapshot_tree(info.run_dir) == before, "audit changed the run directory"

    assert invoke("gc", info.run_dir).exit_code == 0
    code, data = audit_json(info.run_dir, "--verify-blobs")
    assert code == 0, data["findings"]
    assert kinds(data, "note") == ["crashed_attempt"]  # history stays visible
    assert not any(path.exists() for path in info.stray_files)


def test_sigkilled_writer_mid_checkpoint(tmp_path):
    """A real process killed between its last shard.written and the commit."""
    run_dir = tmp_path / "run"
    assert run_killed_writer(run_dir) == -9
    torn = cid_for(30, 1)
    code, data = audit_json(run_dir)
    # Nobody restarted the job yet: its process is gone, so audit calls it a crash and says what to do.
    assert code == 1 and kinds(data) == ["dead_attempt"]
    dead = next(f for f in data["findings"] if f["kind"] == "dead_attempt")
    assert "shard.written" in dead["message"] and "restart the job" in dead["fix"] and cid_for(20, 1) in dead["fix"]
    assert "in_flight_checkpoint" in kinds(data, "note")

    # The requeued job begins a new attempt (fencing the dead one) and resumes from the projection.
    led = Ledger.open(run_dir)
    resume = led.projection().resume.checkpoint_id
    attempt = led.begin_attempt(job_id="3002", resumed_from=resume)
    led.append(AttemptEnded(epoch=attempt.epoch, reason="completed", last_step=20), epoch=attempt.epoch)
    led.close()
    code, data = audit_json(run_dir)
    assert code == 1 and kinds(data) == ["torn_checkpoint"]
    assert next(f for f in data["findings"] if f["kind"] == "torn_checkpoint")["subject"] == torn
    assert "rank 0: shard recorded; rank 1: shard recorded" in json.dumps(data)

    assert invoke("gc", run_dir).exit_code == 0
    code, data = audit_json(run_dir, "--verify-blobs")
    assert code == 0, data["findings"]
    assert not (run_dir / "blobs" / torn).exists()


def test_damaged_shards(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    view = Ledger.open(info.run_dir, read_only=True).projection()
    missing = view.checkpoints[info.committed[0]].shards[0]
    resized = view.checkpoints[info.committed[1]].shards[1]
    flipped = view.checkpoints[info.committed[-1]].shards[0]  # the resume target
    (info.run_dir / missing.location).unlink()
    with open(info.run_dir / resized.location, "ab") as fh:
        fh.write(b"extra")
    data = bytearray((info.run_dir / flipped.location).read_bytes())
    data[7] ^= 0xFF
    (info.run_dir / flipped.location).write_bytes(bytes(data))

    code, report = audit_json(info.run_dir)
    assert code == 1 and kinds(report) == ["missing_shard", "size_mismatch"]  # a same-size flip needs hashing
    code, report = audit_json(info.run_dir, "--verify-blobs")
    assert code == 1 and kinds(report) == ["hash_mismatch", "missing_shard", "size_mismatch"]
    found = {f["kind"]: f for f in report["findings"]}
    assert found["missing_shard"]["subject"] == missing.location
    assert found["hash_mismatch"]["subject"] == flipped.location
    assert "IS the resume target" in found["hash_mismatch"]["fix"] and info.committed[-2] in found["hash_mismatch"]["fix"]


def test_ledger_file_damage(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    with open(info.run_dir / "ledger.db", "ab") as fh:
        fh.write(b"appended garbage" * 100)
    code, data = audit_json(info.run_dir)
    assert code == 1 and kinds(data) == ["trailing_garbage"]
    assert "1600 bytes past" in data["findings"][0]["message"]


def test_protocol_anomaly_is_a_problem(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    led = Ledger.open(info.run_dir)
    led.append(ShardWritten(checkpoint_id="ghost", rank=0, location="blobs/ghost/e0/r0", bytes=1, hash="blake2b:00"))
    led.close()
    code, data = audit_json(info.run_dir)
    assert code == 1 and kinds(data) == ["anomaly"]
    assert data["findings"][0]["seq"] == 43 and "ghost" in data["findings"][0]["message"]


def test_library_function_for_python_users(tmp_path):
    info = build_crashed_run(tmp_path / "run", restart=False)
    report = audit(Ledger.open(info.run_dir, read_only=True), process_alive=lambda host, pid: False)
    assert not report.healthy
    assert sorted(f.kind for f in report.problems) == ["aborted_files", "dead_attempt"]
    # Until a new attempt fences it, the attempt might still be writing: its unfinished save is not
    # called torn and its unrecorded files are not called stray (gc would not touch them either).
    assert "torn_checkpoint" not in {f.kind for f in report.findings}
    assert "files_in_progress" in {f.kind for f in report.notes}
    alive = audit(Ledger.open(info.run_dir, read_only=True), process_alive=lambda host, pid: True)
    assert "running_attempt" in {f.kind for f in alive.notes} and "dead_attempt" not in {f.kind for f in alive.findings}


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_unreadable_ledger_exits_two(tmp_path, damage):
    info = build_healthy_run(tmp_path / "run")
    db = info.run_dir / "ledger.db"
    if damage == "truncate":
        db.write_bytes(db.read_bytes()[:100])
    else:
        db.unlink()
    result = invoke("audit", info.run_dir)
    assert result.exit_code == 2


def test_snapshot_is_checked_against_a_full_replay(tmp_path):
    from ledger.projection import State, encode_state
    from runs import build_big_log

    from ledger.store import raw

    build_big_log(tmp_path / "run", 5200)
    led = Ledger.open(tmp_path / "run")
    led.projection()  # a writer stores a snapshot once enough events have accumulated
    led.close()
    conn = raw.connect(tmp_path / "run" / "ledger.db")
    (snap_seq,) = conn.execute("SELECT MAX(seq) FROM snapshots").fetchone()
    assert snap_seq is not None
    code, data = audit_json(tmp_path / "run")
    assert "snapshot_mismatch" not in kinds(data)
    conn.execute("UPDATE snapshots SET state = ?", (encode_state(State(seq=snap_seq, last_step=7)),))
    conn.commit()
    conn.close()
    code, data = audit_json(tmp_path / "run")
    assert code == 1 and "snapshot_mismatch" in kinds(data)
