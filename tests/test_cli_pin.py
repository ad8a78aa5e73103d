"""``ckpt-ledger pin`` / ``unpin``: operator writes recorded in the log."""

from __future__ import annotations

from click.testing import CliRunner

from cli.main import cli
from ledger import Ledger
from runs import build_crashed_run, build_healthy_run, snapshot_tree


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def pin_events(run_dir):
    return Ledger.open(run_dir, read_only=True).events(tags=["checkpoint.pinned", "checkpoint.unpinned"])


def test_pin_and_unpin_append_operator_events(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    cid = info.committed[1]
    result = invoke("pin", info.run_dir, cid)
    assert result.exit_code == 0 and "pinned" in result.stdout
    assert Ledger.open(info.run_dir, read_only=True).projection().checkpoints[cid].pinned
    again = invoke("pin", info.run_dir, cid)
    assert again.exit_code == 0 and "already pinned" in again.stdout
    assert "pinned" in next(line for line in invoke("inspect", info.run_dir).stdout.splitlines()
                            if line.strip().startswith(cid))
    assert invoke("unpin", info.run_dir, cid).exit_code == 0
    events = pin_events(info.run_dir)
    assert [(e.tag, e.event.checkpoint_id, e.epoch) for e in events] == [
        ("checkpoint.pinned", cid, 0), ("checkpoint.unpinned", cid, 0)]
    assert not Ledger.open(info.run_dir, read_only=True).projection().checkpoints[cid].pinned


def test_pin_by_alias_pins_what_it_points_at(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    assert invoke("pin", info.run_dir, "best").exit_code == 0
    assert [e.event.checkpoint_id for e in pin_events(info.run_dir)] == [info.committed[3]]


def test_unknown_or_dead_checkpoint_is_refused_without_a_write(tmp_path):
    info = build_crashed_run(tmp_path / "run")
    before = snapshot_tree(info.run_dir)
    for ref in ("nope", info.torn[0], info.aborted[0]):
        result = invoke("pin", info.run_dir, ref)
        assert result.exit_code == 1, (ref, result.output)
    assert invoke("unpin", info.run_dir, "nope").exit_code == 1
    assert snapshot_tree(info.run_dir) == before


def test_pinned_checkpoint_survives_gc_with_the_runs_own_policy(tmp_path):
    info = build_healthy_run(tmp_path / "run", keep_last=1)
    assert invoke("pin", info.run_dir, info.committed[0]).exit_code == 0
    assert invoke("gc", info.run_dir).exit_code == 0
    view = Ledger.open(info.run_dir, read_only=True).projection()
    assert {c.checkpoint_id for c in view.checkpoints.values() if c.status == "committed"} == {
        info.committed[0], info.committed[3], info.committed[4]}  # pinned, best, latest
