"""Lineage: resume, latest and retention follow the newest attempt's branch of the checkpoint tree."""

from __future__ import annotations

import json

import pytest
from runs import cid_for, save_checkpoint, start, train_steps
from trainer_support import run_cli, view_of

from ledger import RetentionPolicy, lineage, retention
from ledger.events import CheckpointAborted


@pytest.fixture
def branched(run_dir):
    """Attempt 1 saves 10..60; attempt 2 resumes explicitly from 30 and saves 40 and 45."""
    led = start(run_dir)
    a = led.begin_attempt(world_size=2, stack="ddp").epoch
    for step in (10, 20, 30, 40, 50, 60):
        train_steps(led, a, step - 9, step)
        save_checkpoint(led, a, step)
    b = led.begin_attempt(world_size=2, stack="ddp", resumed_from=cid_for(30, a)).epoch
    yield led, a, b
    led.close()


def test_explicit_resume_moves_the_branch_before_anything_is_committed(branched):
    led, a, b = branched
    view = led.projection()
    assert (view.resume.checkpoint_id, view.latest.checkpoint_id) == (cid_for(30, a), cid_for(30, a))
    assert [c.checkpoint_id for c in view.resume_candidates()] == [cid_for(s, a) for s in (30, 20, 10)]
    # Before attempt 2 began, attempt 1's head was the answer.
    before = led.projection(at=view.state.attempts[b].started_seq - 1)
    assert (before.resume.checkpoint_id, before.latest.checkpoint_id) == (cid_for(60, a), cid_for(60, a))


def test_resume_and_latest_are_the_head_of_the_new_branch(branched):
    led, a, b = branched
    train_steps(led, b, 31, 45)
    save_checkpoint(led, b, 40)
    save_checkpoint(led, b, 45)
    view = led.projection()
    assert (view.resume.checkpoint_id, view.latest.checkpoint_id) == (cid_for(45, b), cid_for(45, b))
    state = view.state
    assert [c.checkpoint_id for c in lineage.ancestors(state, cid_for(45, b))] == [
        cid_for(45, b), cid_for(40, b), cid_for(30, a), cid_for(20, a), cid_for(10, a)]
    assert state.checkpoints[cid_for(40, a)].parent == cid_for(30, a)  # the tree forks at 30
    assert lineage.branch_point(state).checkpoint_id == cid_for(30, a)
    # A restart after that (no --resume) stays on the branch: 45, never attempt 1's 60.
    c = led.begin_attempt(world_size=2, stack="ddp", resumed_from=view.resume.checkpoint_id).epoch
    assert led.projection().resume.checkpoint_id == cid_for(45, b)
    assert lineage.branch_point(led.projection().state) is None
    assert c == b + 1


def test_resume_falls_back_along_ancestors_never_to_another_branch(branched):
    led, a, b = branched
    save_checkpoint(led, b, 40)
    for cid in (cid_for(40, b), cid_for(30, a)):
        led.report_corruption(cid, "blobs/x", "xxh3:00", None, epoch=b)
    view = led.projection()
    assert view.resume.checkpoint_id == cid_for(20, a)  # not attempt 1's 60, 50 or 40
    for cid in (cid_for(20, a), cid_for(10, a)):
        led.report_corruption(cid, "blobs/x", "xxh3:00", None, epoch=b)
    assert led.projection().resume is None and led.projection().latest is None


def test_an_aborted_save_is_nobodys_parent(run_dir):
    with start(run_dir) as led:
        a = led.begin_attempt().epoch
        save_checkpoint(led, a, 10)
        save_checkpoint(led, a, 20, commit=False)
        led.append(CheckpointAborted(checkpoint_id=cid_for(20, a), reason="rank 1 died"), epoch=a)
        led.begin_checkpoint(checkpoint_id="step000020-e1-r1", step=20, ranks=[0], world_size=1, stack="ddp", epoch=a)
        state = led.projection().state
        assert state.checkpoints["step000020-e1-r1"].parent == cid_for(10, a)
        assert state.checkpoints[cid_for(20, a)].parent == cid_for(10, a)


def test_a_log_without_attempts_is_one_branch(run_dir):
    with start(run_dir) as led:
        save_checkpoint(led, 0, 10)
        save_checkpoint(led, 0, 20)
        view = led.projection()
        assert lineage.current_branch(view.state) is None
        assert view.resume.checkpoint_id == cid_for(20, 0)
        assert all(c["on_current_branch"] for c in view.to_dict()["checkpoints"])


def test_retention_counts_keep_last_along_the_branch_and_says_abandoned(branched):
    led, a, b = branched
    led.append(__import__("ledger.events", fromlist=["CheckpointPinned"]).CheckpointPinned(
        checkpoint_id=cid_for(50, a)))
    save_checkpoint(led, b, 40)
    save_checkpoint(led, b, 45)
    view = led.projection()
    planned = {d.checkpoint_id: d.reason for d in retention.plan(view.state, RetentionPolicy(keep_last=3))}
    # keep-last 3 keeps 45-e2, 40-e2, 30-e1 (the branch), never attempt 1's 60 and 40 by step.
    assert planned == {
        cid_for(10, a): "not kept by policy (keep-last 3)",
        cid_for(20, a): "not kept by policy (keep-last 3)",
        cid_for(40, a): f"abandoned branch (attempt {b} resumed from {cid_for(30, a)})",
        cid_for(60, a): f"abandoned branch (attempt {b} resumed from {cid_for(30, a)})",
    }
    # keep-every counts only the branch too; keep-best is global.
    planned = {d.checkpoint_id for d in retention.plan(view.state, RetentionPolicy(keep_every=20, keep_last=1))}
    assert cid_for(40, a) in planned and cid_for(40, b) not in planned and cid_for(20, a) not in planned


def test_gc_dry_run_names_the_abandoned_branch(branched, capsys):
    from runs import run_main

    led, a, b = branched
    save_checkpoint(led, b, 40)
    led.close()
    code, out, err = run_main(["gc", str(led.run_dir), "--dry-run", "--keep-last", "2", "--json"], capsys)
    assert code == 0, err
    reasons = {d["checkpoint_id"]: d["reason"] for d in json.loads(out)["checkpoints"]}
    assert reasons[cid_for(60, a)].startswith("abandoned branch")
    assert reasons[cid_for(10, a)] == "not kept by policy (keep-last 2)"
    code, out, err = run_main(["inspect", str(led.run_dir)], capsys)
    line = next(x for x in out.splitlines() if x.strip().startswith(cid_for(60, a)))
    assert "abandoned" in line


@pytest.mark.timeout(600)
def test_issue_scenario_through_the_real_cli(tmp_path):
    """The issue's opening scenario: a requeue after an explicit branch continues the branch."""
    run_dir = str(tmp_path / "R")
    common = ["--run-dir", run_dir, "--ckpt-every", "10", "--seed", "1", "--eval-every", "10"]
    assert run_cli("train", *common, "--steps", "60").returncode == 0
    done = run_cli("train", *common, "--steps", "45", "--resume", "step000030-e1")
    assert done.returncode == 0, done.stderr
    shown = json.loads(run_cli("inspect", run_dir, "--json").stdout)
    assert shown["resume"]["checkpoint_id"] == shown["latest"]["checkpoint_id"] == "step000045-e2"
    by_id = {c["checkpoint_id"]: c for c in shown["checkpoints"]}
    assert by_id["step000040-e2"]["parent"] == "step000030-e1" and by_id["step000060-e1"]["on_current_branch"] is False
    done = run_cli("train", *common, "--steps", "100")
    assert done.returncode == 0, done.stderr
    assert "resumed from step000045-e2" in done.stderr + done.stdout
    view = view_of(tmp_path / "R")
    assert view.attempts[-1].resumed_from == "step000045-e2"
    assert view.resume.checkpoint_id == view.latest.checkpoint_id == "step000100-e3"


def test_a_restart_with_nothing_usable_on_its_branch_names_the_other_branch(branched):
    from trainer.sources import fresh_start_refusal

    led, a, b = branched
    for step in (30, 20, 10):
        led.report_corruption(cid_for(step, a), "blobs/x", "xxh3:00", None, epoch=b)
    view = led.projection()
    assert view.resume is None
    message = fresh_start_refusal(view)
    assert f"e.g. {cid_for(60, a)} (step 60)" in message and "--resume ID" in message
