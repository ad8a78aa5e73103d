"""``ckpt-ledger gc``: retention from the run's config, stray files, and a dry run that is exactly the real run."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import cli
from ledger import Ledger
from runs import build_crashed_run, build_healthy_run, crash_mid_checkpoint, save_checkpoint, snapshot_tree


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def gc_json(run_dir, *extra):
    result = invoke("gc", run_dir, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def plan_part(summary):
    return {k: summary[k] for k in ("policy", "checkpoints", "files", "bytes")}


def test_dry_run_is_exactly_the_real_run_and_changes_nothing(tmp_path):
    info = build_crashed_run(tmp_path / "run", keep_last=1)
    before = snapshot_tree(info.run_dir)
    dry = gc_json(info.run_dir, "--dry-run")
    assert snapshot_tree(info.run_dir) == before, "gc --dry-run changed the run directory"
    assert not (info.run_dir / "ledger.db-wal").exists()
    assert dry["dry_run"] is True and dry["policy"] == {"keep_last": 1, "keep_every": None, "keep_best": None,
                                                     "keep_every_seconds": None, "keep_for": None,
                                                     "keep_without_metric": False}
    reasons = {c["checkpoint_id"]: c["reason"] for c in dry["checkpoints"]}
    assert set(reasons) == {info.aborted[0], info.torn[0], *info.committed[:2]}
    assert "aborted" in reasons[info.aborted[0]] and "torn" in reasons[info.torn[0]]
    assert "keep-last 1" in reasons[info.committed[0]]
    assert sorted(f["location"] for f in dry["files"]) == sorted(
        p.relative_to(info.run_dir).as_posix() for p in info.stray_files)
    human = invoke("gc", info.run_dir, "--dry-run")
    assert "would delete 4 checkpoint(s)" in human.stdout and "would delete 2 stray file(s)" in human.stdout

    real = gc_json(info.run_dir)
    assert real["dry_run"] is False and plan_part(real) == plan_part(dry)
    view = Ledger.open(info.run_dir, read_only=True).projection()
    for cid in reasons:
        assert view.checkpoints[cid].status == "deleted"
        assert not (info.run_dir / "blobs" / cid).exists()
    assert not any(p.exists() for p in info.stray_files)
    survivor = view.checkpoints[info.committed[-1]]
    assert survivor.status == "committed" and all((info.run_dir / s.location).is_file() for s in survivor.shards)
    # gc is an operator write: outside any attempt, so it is never fenced.
    ops = Ledger.open(info.run_dir, read_only=True).events(tags=["checkpoint.deletion_requested", "checkpoint.deleted"])
    assert len(ops) == 8 and {e.epoch for e in ops} == {0}
    # Nothing left to do the second time.
    again = gc_json(info.run_dir)
    assert again["checkpoints"] == [] and again["files"] == []
    assert "nothing to delete" in invoke("gc", info.run_dir).stdout


def test_policy_comes_from_the_run_config_and_flags_override_it(tmp_path):
    info = build_healthy_run(tmp_path / "run", keep_last=2)
    # best is step 40 (eval_loss 1.1), latest/resume step 50: keep-last 2 keeps both anyway.
    planned = gc_json(info.run_dir, "--dry-run")
    assert [c["checkpoint_id"] for c in planned["checkpoints"]] == info.committed[2::-1]
    flagged = gc_json(info.run_dir, "--dry-run", "--keep-last", "4")
    assert [c["checkpoint_id"] for c in flagged["checkpoints"]] == [info.committed[0]]
    every = gc_json(info.run_dir, "--dry-run", "--keep-every", "20")
    assert [c["checkpoint_id"] for c in every["checkpoints"]] == [info.committed[2], info.committed[0]]
    best = gc_json(info.run_dir, "--dry-run", "--keep-last", "0", "--keep-best", "2")
    # keep-best 2 = step 40 (1.1) and step 20 (1.2); latest step 50 is protected.
    assert sorted(c["checkpoint_id"] for c in best["checkpoints"]) == sorted([info.committed[0], info.committed[2]])


def test_protected_checkpoints_survive_the_harshest_policy(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    summary = gc_json(info.run_dir, "--keep-last", "0", "--keep-best", "0")
    deleted = {c["checkpoint_id"] for c in summary["checkpoints"]}
    assert deleted == set(info.committed[:3])
    view = Ledger.open(info.run_dir, read_only=True).projection()
    assert view.latest.checkpoint_id == info.committed[4] and view.best.checkpoint_id == info.committed[3]
    assert view.resume.checkpoint_id == info.committed[4]


def test_live_save_is_never_touched(tmp_path):
    """A running attempt's unfinished save (recorded shard + temp file) survives gc; the rest is collected."""
    info = build_healthy_run(tmp_path / "run")
    led = Ledger.open(info.run_dir)
    attempt = led.begin_attempt(job_id="live", resumed_from=info.committed[-1])
    live_cid, live_tmp = crash_mid_checkpoint(led, attempt.epoch, 60)
    (info.run_dir / "blobs" / "junk.bin").write_bytes(b"j")
    summary = gc_json(info.run_dir, "--keep-last", "1")
    assert live_cid not in {c["checkpoint_id"] for c in summary["checkpoints"]}
    assert [f["location"] for f in summary["files"]] == ["blobs/junk.bin"]
    assert live_tmp.exists() and led.projection().checkpoints[live_cid].status == "in_flight"
    # The save then completes normally, after gc ran.
    save_checkpoint(led, attempt.epoch, 70)
    led.close()


@pytest.mark.parametrize("policy", [["--keep-last", "0"], ["--keep-every", "1000"], ["--keep-best", "0"],
                                    ["--keep-last", "0", "--keep-every", "7", "--keep-best", "0"]])
def test_pinned_checkpoint_survives_every_policy(tmp_path, policy):
    info = build_healthy_run(tmp_path / "run")
    oldest = info.committed[0]
    assert invoke("pin", info.run_dir, oldest).exit_code == 0
    summary = gc_json(info.run_dir, *policy)
    assert oldest not in {c["checkpoint_id"] for c in summary["checkpoints"]}
    assert {c["checkpoint_id"] for c in summary["checkpoints"]} == set(info.committed[1:3])
    ckpt = Ledger.open(info.run_dir, read_only=True).projection().checkpoints[oldest]
    assert ckpt.status == "committed" and all((info.run_dir / s.location).is_file() for s in ckpt.shards)
    # Unpinned, the same policy removes it.
    assert invoke("unpin", info.run_dir, oldest).exit_code == 0
    assert [c["checkpoint_id"] for c in gc_json(info.run_dir, *policy)["checkpoints"]] == [oldest]
