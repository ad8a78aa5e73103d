"""Time-based retention (keep_every_seconds, keep_for) and keep_best's checkpoints without the metric:
the pure plan at a given ``now``, its ``gc --dry-run`` reasons, and the CLI/trainer options."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from cli.main import cli
from ledger import Ledger, RetentionPolicy, retention
from ledger.events import MetricRecorded
from ledger.time_retention import format_duration, parse_duration
from runs import save_checkpoint, start
from trainer import TrainerConfig

HOUR = 3600.0


def committed_run(run_dir, steps, *, eval_at=(), **config):
    """A run with one committed checkpoint per step (``eval_loss`` recorded at ``eval_at``)."""
    led = start(run_dir, **config)
    epoch = led.begin_attempt(world_size=2, stack="ddp").epoch
    for step in steps:
        save_checkpoint(led, epoch, step, eval_loss=1.0 / step if step in eval_at else None)
    return led


def plan_at(led, policy, commit_times, now):
    """The plan with each checkpoint's commit time set to ``commit_times[step]`` (the projection is data)."""
    view = led.projection()
    for ckpt in view.state.checkpoints.values():
        ckpt.committed_at = commit_times[ckpt.step]
    return {d.step: d.reason for d in retention.plan(view.state, policy, view.best_rule, now=now)}


def test_keep_for_keeps_young_checkpoints_and_deletes_the_rest_with_the_age_in_the_reason(tmp_path):
    led = committed_run(tmp_path / "run", [10, 20, 30, 40])
    times = {10: 0.0, 20: 10 * HOUR, 30: 30 * HOUR, 40: 47 * HOUR}
    deletions = plan_at(led, RetentionPolicy(keep_for="1d"), times, now=48 * HOUR)
    assert sorted(deletions) == [10, 20]  # 48 h and 38 h old; 30 (18 h) is young, 40 is latest
    assert deletions[10] == "not kept by policy (keep-for 1d)"
    # An hour later nothing more expired; two days later everything but latest/resume went.
    assert sorted(plan_at(led, RetentionPolicy(keep_for="1d"), times, now=49 * HOUR)) == [10, 20]
    assert sorted(plan_at(led, RetentionPolicy(keep_for=86400), times, now=200 * HOUR)) == [10, 20, 30]


def test_keep_every_seconds_keeps_the_first_checkpoint_of_each_window(tmp_path):
    led = committed_run(tmp_path / "run", [10, 20, 30, 40, 50])
    times = {10: 0.5 * HOUR, 20: 0.9 * HOUR, 30: 1.2 * HOUR, 40: 1.7 * HOUR, 50: 2.1 * HOUR}
    deletions = plan_at(led, RetentionPolicy(keep_every_seconds="1h"), times, now=3 * HOUR)
    assert sorted(deletions) == [20, 40]  # 10 opens hour 0, 30 hour 1, 50 hour 2 (and is latest)
    combined = plan_at(led, RetentionPolicy(keep_every_seconds=HOUR, keep_last=2), times, now=3 * HOUR)
    assert sorted(combined) == [20]  # keep-last 2 also keeps 40
    assert "keep-every-seconds 1h" in combined[20]


def test_keep_best_drops_checkpoints_without_the_metric_unless_asked(tmp_path):
    led = committed_run(tmp_path / "run", [10, 20, 30, 40], eval_at=(10, 30))
    times = dict.fromkeys([10, 20, 30, 40], 0.0)
    deletions = plan_at(led, RetentionPolicy(keep_best=1), times, now=0.0)
    # 30 is best (1/30) and 40 latest; 10 is ranked below the best; 20 has no eval_loss at all.
    assert sorted(deletions) == [10, 20]
    assert "has no eval_loss, so keep-best cannot rank it" in deletions[20]
    assert "has no eval_loss" not in deletions[10]
    assert plan_at(led, RetentionPolicy(keep_best=1, keep_without_metric=True), times, now=0.0) == {
        10: "not kept by policy (keep-best 1, keep-without-metric)"}


def test_the_real_clock_drives_gc_and_its_dry_run_shows_the_same(tmp_path):
    run_dir = tmp_path / "run"
    led = committed_run(run_dir, [10, 20])
    time.sleep(1.2)
    epoch = led.projection().state.current_epoch
    save_checkpoint(led, epoch, 30)
    led.close()
    runner = CliRunner()
    young = json.loads(runner.invoke(cli, ["gc", str(run_dir), "--dry-run", "--json", "--keep-for", "1h"]).stdout)
    assert young["checkpoints"] == [] and young["policy"]["keep_for"] == HOUR
    dry = runner.invoke(cli, ["gc", str(run_dir), "--dry-run", "--keep-for", "1s"])
    assert dry.exit_code == 0, dry.output
    assert "step000010-e1" in dry.output and "step000020-e1" in dry.output and "keep-for 1s" in dry.output
    done = json.loads(runner.invoke(cli, ["gc", str(run_dir), "--json", "--keep-for", "1s"]).stdout)
    assert sorted(c["step"] for c in done["checkpoints"]) == [10, 20]
    bad = runner.invoke(cli, ["gc", str(run_dir), "--keep-for", "soon"])
    assert bad.exit_code == 2 and "keep-for must be a duration" in bad.output


def test_the_policy_recorded_by_a_run_is_what_gc_applies(tmp_path):
    led = committed_run(tmp_path / "run", [10, 20, 30], keep_for=1.0, keep_last=1)
    led.close()
    time.sleep(1.2)
    result = CliRunner().invoke(cli, ["gc", str(tmp_path / "run"), "--dry-run", "--json"])
    summary = json.loads(result.stdout)
    assert summary["policy"]["keep_for"] == 1.0 and summary["policy"]["keep_last"] == 1
    assert sorted(c["step"] for c in summary["checkpoints"]) == [10, 20]


def test_durations_parse_and_bad_ones_are_named():
    assert parse_duration("90", name="x") == 90 and parse_duration("30m", name="x") == 1800
    assert parse_duration("1.5h", name="x") == 5400 and parse_duration("2w", name="x") == 14 * 86400
    assert format_duration(5400) == "1.5h" and format_duration(86400) == "1d"
    for bad in ("soon", "-3", "0", True, "5y"):
        with pytest.raises(ValueError, match="x must be a"):
            parse_duration(bad, name="x")
    cfg = TrainerConfig(run_dir="r", keep_for="7d", keep_every_seconds="6h", ckpt_every_seconds="10m")
    assert (cfg.keep_for, cfg.keep_every_seconds, cfg.ckpt_every_seconds) == (7 * 86400, 6 * HOUR, 600)
    assert cfg.canonical()["keep_for"] == 7 * 86400
    with pytest.raises(ValueError, match="keep_every_seconds must be a"):
        TrainerConfig(run_dir="r", keep_every_seconds="often")


def test_a_metric_recorded_later_still_ranks(tmp_path):
    led = committed_run(tmp_path / "run", [10, 20, 30], eval_at=(30,))
    epoch = led.projection().state.current_epoch
    led.append(MetricRecorded(name="eval_loss", value=0.01, step=10, checkpoint_id="step000010-e1"), epoch=epoch)
    deletions = plan_at(led, RetentionPolicy(keep_best=1), dict.fromkeys([10, 20, 30], 0.0), now=0.0)
    assert sorted(deletions) == [20]  # 10 is now the best; 30 is latest
