"""``ckpt-ledger gc``: apply the run's retention policy and remove stray files of torn or crashed saves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cli.options import check_run_dir, duration_option, json_option, open_read_only, run_dir_argument
from cli.tables import human_bytes, render_table
from ledger import Ledger, RetentionPolicy
from ledger.garbage import GcPlan, StrayFile, execute_gc, plan_gc
from ledger.retention import Deletion


def resolve_policy(config: dict[str, Any], keep_last: int | None, keep_every: int | None,
                   keep_best: int | None, keep_every_seconds: float | None = None, keep_for: float | None = None,
                   keep_without_metric: bool | None = None) -> RetentionPolicy:
    """The run's recorded policy, with any rule given on the command line replacing the recorded one."""
    recorded = RetentionPolicy.from_config(config).as_dict()
    given = {"keep_last": keep_last, "keep_every": keep_every, "keep_best": keep_best,
             "keep_every_seconds": keep_every_seconds, "keep_for": keep_for, "keep_without_metric": keep_without_metric}
    return RetentionPolicy(**{name: recorded[name] if value is None else value for name, value in given.items()})


def _sizes(led: Ledger, strays: list[StrayFile]) -> dict[str, int | None]:
    return {s.location: None if s.upload else led.blobs.size(s.location) for s in strays}


def plan_to_dict(plan: GcPlan, deletions: list[Deletion], strays: list[StrayFile], sizes: dict[str, int | None],
                 dry_run: bool) -> dict[str, Any]:
    """The JSON form of ``gc`` (the same shape with and without ``--dry-run``)."""
    policy = plan.policy
    return {
        "dry_run": dry_run,
        "seq": plan.seq,
        "policy": policy.as_dict(),
        "checkpoints": [{"checkpoint_id": d.checkpoint_id, "step": d.step, "reason": d.reason,
                         "locations": list(d.locations), "bytes": d.bytes} for d in deletions],
        "files": [{"location": s.location, "checkpoint_id": s.checkpoint_id, "reason": s.reason,
                   "bytes": sizes.get(s.location), "upload": s.upload} for s in strays],
        "bytes": sum(d.bytes for d in deletions) + sum(v or 0 for v in sizes.values()),
    }


def render_plan(summary: dict[str, Any]) -> str:
    """The human form of ``gc`` / ``gc --dry-run``."""
    verb = "would delete" if summary["dry_run"] else "deleted"
    policy = RetentionPolicy(**summary["policy"]).describe()
    lines = [f"retention policy: {policy}  ·  as of event {summary['seq']}"]
    if not summary["checkpoints"] and not summary["files"]:
        lines.append("nothing to delete")
        return "\n".join(lines)
    if summary["checkpoints"]:
        rows = [[c["checkpoint_id"], c["step"], len(c["locations"]), human_bytes(c["bytes"]), c["reason"]]
                for c in summary["checkpoints"]]
        lines += ["", f"{verb} {len(rows)} checkpoint(s)",
                  render_table(["checkpoint", "step", "files", "size", "why"], rows)]
    if summary["files"]:
        rows = [[f["location"], human_bytes(f["bytes"]), f["reason"]] for f in summary["files"]]
        lines += ["", f"{verb} {len(rows)} stray file(s)", render_table(["file", "size", "why"], rows)]
    lines += ["", f"{'would free' if summary['dry_run'] else 'freed'} {human_bytes(summary['bytes'])}"]
    return "\n".join(lines)


@click.command("gc")
@run_dir_argument
@click.option("--dry-run", is_flag=True, help="Print exactly what would be deleted and why; change nothing.")
@json_option
@click.option("--keep-last", type=click.IntRange(min=0), default=None, metavar="K",
              help="Keep the K highest-step checkpoints (overrides the run's recorded keep_last).")
@click.option("--keep-every", type=click.IntRange(min=1), default=None, metavar="N",
              help="Keep checkpoints whose step is a multiple of N (overrides keep_every).")
@click.option("--keep-best", type=click.IntRange(min=0), default=None, metavar="K",
              help="Keep the K best checkpoints by the run's metric (overrides keep_best).")
@click.option("--keep-every-seconds", callback=duration_option, default=None, metavar="DURATION",
              help="Keep the first checkpoint of each DURATION of wall-clock time, e.g. 6h (overrides).")
@click.option("--keep-for", callback=duration_option, default=None, metavar="DURATION",
              help="Keep every checkpoint committed less than DURATION ago, e.g. 7d (overrides).")
@click.option("--keep-without-metric/--no-keep-without-metric", default=None,
              help="With keep-best: also keep checkpoints that have no value of the metric (overrides).")
def gc_command(run_dir: Path, dry_run: bool, as_json: bool, keep_last: int | None, keep_every: int | None,
               keep_best: int | None, keep_every_seconds: float | None, keep_for: float | None,
               keep_without_metric: bool | None) -> None:
    """Delete what the run no longer needs: checkpoints its retention policy drops, torn and aborted
    saves, and stray files (temp files and unrecorded files of crashed writes).

    The policy is the run's own (keep_last / keep_every / keep_best and the
    time rules keep_every_seconds / keep_for from its config); a --keep-* flag
    replaces that one rule. Time rules use each checkpoint's commit time. The latest, best, resume
    target, pinned and in-flight checkpoints are never deleted. Every checkpoint
    deletion is recorded in the ledger before and after its files go.

    \b
    Examples:
      ckpt-ledger gc runs/exp1 --dry-run           # what would go, and why
      ckpt-ledger gc runs/exp1
      ckpt-ledger gc runs/exp1 --keep-last 2 --json
      ckpt-ledger gc runs/exp1 --keep-last 3 --keep-every-seconds 6h --keep-for 2d --dry-run
    """
    check_run_dir(run_dir)
    # A dry run opens read-only: not even a -wal file may appear.
    led = open_read_only(run_dir) if dry_run else Ledger.open(run_dir)
    with led:
        run = led.projection().run
        policy = resolve_policy(run.config if run else {}, keep_last, keep_every, keep_best, keep_every_seconds,
                                keep_for, keep_without_metric)
        plan = plan_gc(led, policy)
        sizes = _sizes(led, plan.strays)
        if dry_run:
            deletions, strays = plan.deletions, plan.strays
        else:
            result = execute_gc(led, plan)
            deletions, strays = result.deletions, result.removed
    summary = plan_to_dict(plan, deletions, strays, sizes, dry_run)
    click.echo(json.dumps(summary, indent=2) if as_json else render_plan(summary))
