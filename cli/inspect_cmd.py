"""``ckpt-ledger inspect``: the run at a glance — resume target, latest/best, attempts, checkpoints, goodput."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.options import json_option, open_read_only, run_dir_argument, seq_type
from cli.tables import human_bytes, human_duration, render_table
from ledger import Ledger
from ledger.decisions import is_torn, metric_of
from ledger.lineage import current_branch, on_current_branch
from ledger.statuses import AttemptStatus, CheckpointStatus
from ledger.view import View


@click.command("inspect")
@run_dir_argument
@json_option
@click.option("--at", "at_seq", type=seq_type, default=None, metavar="SEQ",
              help="Show the run as it stood at this log sequence number.")
def inspect_command(run_dir: Path, as_json: bool, at_seq: int | None) -> None:
    """Show what the ledger says about a run: what a restart would load, and why.

    \b
    Examples:
      ckpt-ledger inspect runs/exp1
      ckpt-ledger inspect runs/exp1 --json | jq .resume
      ckpt-ledger inspect runs/exp1 --at 120      # the run as of event 120
    """
    with open_read_only(run_dir) as led:
        newest = led.max_seq()
        if at_seq is not None and at_seq > newest:
            raise click.BadParameter(f"SEQ {at_seq} is past the end of the log (newest is {newest})", param_hint="--at")
        view = led.projection(at=at_seq)
        last_seen = last_event_times(led, view)
    if as_json:
        data = view.to_dict()
        for attempt in data["attempts"]:
            attempt["last_event_at"] = last_seen.get(attempt["epoch"], attempt["ended_at"])
        click.echo(json.dumps(data, indent=2, sort_keys=False))
    else:
        click.echo(render_view(view, run_dir, last_seen))


def last_event_times(led: Ledger, view: View) -> dict[int, float]:
    """When each attempt that never recorded ``attempt.ended`` was last heard from (by its newest event)."""
    open_attempts = [a for a in view.attempts if a.ended_at is None]
    newest = led.last_events(open_attempts)
    return {a.epoch: newest[a.epoch].recorded_at if a.epoch in newest else a.started_at for a in open_attempts}


def _ref(ckpt) -> str:  # noqa: ANN001 - CheckpointState or None
    return "-" if ckpt is None else f"{ckpt.checkpoint_id} (step {ckpt.step})"


def _reason(attempt) -> str | None:  # noqa: ANN001 - AttemptState
    if attempt.status == AttemptStatus.CRASHED:
        return "no attempt.ended"
    if attempt.status == AttemptStatus.RUNNING:
        return None
    if attempt.status == AttemptStatus.FENCED:
        return f"fenced by epoch {attempt.fenced_by}" if attempt.fenced_by else "fenced"
    return attempt.reason + (f" ({attempt.preempted_by})" if attempt.preempted_by else "")


def render_view(view: View, run_dir: Path, last_seen: dict[int, float] | None = None) -> str:
    """The human form of ``inspect``."""
    last_seen = last_seen or {}
    run = view.run
    lines = [f"run {run.run_id if run else '(not started)'}  ·  {run_dir}  ·  as of event {view.seq}"]
    if run is not None:
        lines.append(f"  config {run.config_hash[:16] or '-'}  ·  code {run.code_id or '-'}")
    best = view.best
    metric = view.best_rule.metric
    latest = view.latest
    latest_value = metric_of(view.state, latest, metric) if latest is not None else None
    lines += [
        "",
        f"  resume  {_ref(view.resume)}",
        f"  latest  {_ref(latest)}" + (f"  {metric}={latest_value:.6g}" if latest_value is not None else ""),
        f"  best    {_ref(best.checkpoint if best else None)}"
        + (f"  {best.metric}={best.value:.6g} ({view.best_rule.mode})" if best else f"  (no {metric} recorded)"),
        f"  aliases {', '.join(f'{a} -> {c}' for a, c in sorted(view.state.aliases.items())) or '-'}",
        f"  last step {view.last_step if view.last_step is not None else '-'}  ·  "
        f"goodput {view.goodput:.1%} ({view.state.steps_lost} of {view.state.steps_run} steps lost to restarts)",
    ]
    attempts = view.attempts
    if attempts:
        rows = []
        for a in attempts:
            if a.ended_at is not None:
                duration = human_duration(a.ended_at - a.started_at)
            elif a.epoch in last_seen:  # never ended: how long it was heard from
                duration = "≥" + human_duration(last_seen[a.epoch] - a.started_at)
            else:
                duration = None
            rows.append([a.epoch, a.job_id, a.status, _reason(a), a.resumed_from, a.first_step, a.last_step,
                         a.steps_lost, f"{a.stack} x{a.world_size}", duration])
        lines += ["", "attempts", render_table(
            ["epoch", "job", "status", "reason", "resumed from", "from step", "last step", "steps lost", "stack",
             "duration"], rows)]
    checkpoints = list(view.checkpoints.values())
    if checkpoints:
        protected = view.protected()
        branch = current_branch(view.state)
        rows = []
        for c in checkpoints:
            topo = "·".join(f"{k}{v}" for k, v in sorted(c.topology.items())) or "-"
            status = "torn" if is_torn(view.state, c) else c.status
            if c.pinned and c.status != CheckpointStatus.DELETED:
                status += ", pinned"
            rows.append([c.checkpoint_id, c.step, status, "" if on_current_branch(view.state, c, branch) else "abandoned",
                         c.parent or "(root)", human_bytes(c.bytes), len(c.shards), f"{c.stack} x{c.world_size}", topo,
                         metric_of(view.state, c, metric), protected.get(c.checkpoint_id)])
        lines += ["", "checkpoints", render_table(
            ["checkpoint", "step", "status", "branch", "parent", "size", "shards", "stack", "topology", metric,
             "kept because"], rows)]
    if view.anomalies:
        lines += ["", f"anomalies ({len(view.anomalies)}; see `ckpt-ledger audit`)"]
        lines += [f"  {a}" for a in view.anomalies[:5]]
    return "\n".join(lines)
