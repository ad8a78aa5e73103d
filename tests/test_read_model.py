"""The read model behind ``projection()``: used only when it covers the log, rebuilt by writers, never by readers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from runs import build_healthy_run, cli_argv, cli_env, snapshot_tree

from ledger import Ledger
from ledger.events import CheckpointPinned, StepCompleted
from ledger.health import view_facts
from ledger.read_model import ReadModelView
from ledger.store import raw
from ledger.view import View

ROOT = Path(__file__).resolve().parents[1]


def truth(run_dir: Path) -> dict:
    led = Ledger.open(run_dir, read_only=True)
    return view_facts(View(led.full_replay()))


def damage_read_model(db: Path, how: str, pin: str) -> None:
    conn = raw.connect(db)
    if how == "missing":
        conn.executescript("DROP TABLE rm_facts; DROP TABLE rm_checkpoints; DROP TABLE rm_attempts;")
    elif how == "older-version":
        conn.execute("UPDATE rm_facts SET value = CAST(1 AS BLOB) WHERE key = 'version'")
    elif how == "behind":  # an older ckpt-ledger appended without maintaining it
        (seq,) = conn.execute("SELECT MAX(seq) + 1 FROM events").fetchone()
        payload = json.dumps({"tag": "checkpoint.pinned", "checkpoint_id": pin})
        conn.execute("INSERT INTO events (seq, event_id, epoch, recorded_at, tag, schema_version, checkpoint_id, "
                     "payload) VALUES (?, 'old-writer', 0, 0.0, 'checkpoint.pinned', 1, ?, ?)", (seq, pin, payload))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("how", ["missing", "older-version", "behind"])
def test_readers_fold_without_writing_and_a_writer_open_rebuilds(tmp_path, how):
    info = build_healthy_run(tmp_path / "run")
    damage_read_model(info.run_dir / "ledger.db", how, pin=info.committed[-1])
    expected = truth(info.run_dir)
    before = snapshot_tree(info.run_dir)
    view = Ledger.open(info.run_dir, read_only=True).projection()
    assert not isinstance(view, ReadModelView)  # the read model cannot answer: the fold does
    assert view_facts(view) == expected
    assert snapshot_tree(info.run_dir) == before  # a reader never repairs
    Ledger.open(info.run_dir).close()  # a writer open rebuilds it
    view = Ledger.open(info.run_dir, read_only=True).projection()
    assert isinstance(view, ReadModelView)
    assert view_facts(view) == expected
    assert Ledger.open(info.run_dir, read_only=True).health().healthy


def test_a_view_stays_as_of_its_seq_while_the_log_moves_on(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    led = Ledger.open(info.run_dir)
    view = Ledger.open(info.run_dir, read_only=True).projection()
    before = view_facts(View(led.full_replay()))
    assert isinstance(view, ReadModelView)
    newest = view.latest.checkpoint_id
    led.append(CheckpointPinned(checkpoint_id=newest))
    led.append(StepCompleted(step=10_000), epoch=None)
    # checkpoints/attempts are read lazily: they must still be those of the view's seq
    assert view_facts(view) == before
    assert not view.checkpoints[newest].pinned
    assert led.projection().checkpoints[newest].pinned
    led.close()


def test_a_writers_view_is_readable_after_close(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    with Ledger.open(info.run_dir) as led:
        view = led.projection()
    assert view_facts(view) == truth(info.run_dir)
    assert view.state.seq == view.seq


def test_a_refused_commit_leaves_the_read_model_consistent(tmp_path):
    with Ledger.open(tmp_path / "run") as led:
        epoch = led.begin_attempt().epoch
        led.begin_checkpoint(checkpoint_id="c", step=1, ranks=[0, 1], world_size=2, stack="ddp", epoch=epoch)
        with pytest.raises(Exception, match="rank"):
            led.commit_checkpoint("c", epoch=epoch)
        led.append(StepCompleted(step=2), epoch=epoch)
        assert view_facts(led.projection()) == view_facts(View(led.full_replay()))
    assert Ledger.open(tmp_path / "run", read_only=True).health().healthy


def test_health_reports_a_read_model_that_disagrees_with_the_log(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    conn = raw.connect(info.run_dir / "ledger.db")
    conn.execute("UPDATE rm_checkpoints SET state = (SELECT state FROM rm_checkpoints ORDER BY started_seq LIMIT 1)")
    conn.commit()
    conn.close()
    health = Ledger.open(info.run_dir, read_only=True).health()
    assert [a.kind for a in health.anomalies] == ["read_model_mismatch"]
    result = subprocess.run(cli_argv("audit", str(info.run_dir), "--json"), capture_output=True, text=True,
                            env=cli_env(), timeout=120)
    assert result.returncode == 1
    assert "read_model_mismatch" in {f["kind"] for f in json.loads(result.stdout)["findings"]}


# -- half-created ledgers (a crash during creation) ------------------------------------------------------

_CREATE_AND_DIE = textwrap.dedent("""
    import os, sys
    import ledger.store.format as fmt
    real = fmt.os.link
    def die(*args):
        os.kill(os.getpid(), 9)
    fmt.os.link = die  # SIGKILL after the temp file is built, before it is linked into place
    from ledger import Ledger
    Ledger.open(sys.argv[1])
""")


def test_a_crash_during_creation_leaves_a_leftover_the_next_writer_removes(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _CREATE_AND_DIE, str(run_dir)], timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for p in run_dir.iterdir())
    assert leftovers and all(name.startswith(".ledger.db.") and ".creating" in name for name in leftovers)
    assert not (run_dir / "ledger.db").exists()
    with Ledger.open(run_dir) as led:  # creates the ledger and removes what the dead creator left
        led.begin_attempt()
    assert sorted(p.name for p in run_dir.iterdir() if ".creating" in p.name) == []


def test_audit_reports_a_creation_leftover_and_a_writer_open_removes_it(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    leftover = info.run_dir / ".ledger.db.0123abcd.creating"
    leftover.write_bytes(b"half-built")
    result = subprocess.run(cli_argv("audit", str(info.run_dir), "--json"), capture_output=True, text=True,
                            env=cli_env(), timeout=120)
    findings = json.loads(result.stdout)["findings"]
    assert result.returncode == 1
    assert [f["subject"] for f in findings if f["kind"] == "creation_leftover"] == [str(leftover)]
    assert leftover.exists()  # audit never changes anything
    Ledger.open(info.run_dir).close()
    assert not leftover.exists()
