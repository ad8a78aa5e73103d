"""``ckpt-ledger inspect``: the run at a glance — resume target, latest/best, attempts, checkpoints, goodput."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.options import json_option, open_read_only, run_dir_argument, seq_type
from cli.tables import human_bytes, human_duration, render_table
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
    if as_json:
        click.echo(json.dumps(view.to_dict(), indent=2, sort_keys=False))
    else:
        click.echo(render_view(view, run_dir))


def _ref(ckpt) -> str:  # noqa: ANN001 - CheckpointState or None
    return "-" if ckpt is None else f"{ckpt.checkpoint_id} (step {ckpt.step})"


def render_view(view: View, run_dir: Path) -> str:
    """The human form of ``inspect``."""
    run = view.run
    lines = [f"run {run.run_id if run else '(not started)'}  ·  {run_dir}  ·  as of event {view.seq}"]
    if run is not None:
        lines.append(f"  config {run.config_hash[:16] or '-'}  ·  code {run.code_id or '-'}")
    best = view.best
    lines += [
        "",
        f"  resume  {_ref(view.resume)}",
        f"  latest  {_ref(view.latest)}",
        f"  best    {_ref(best.checkpoint if best else None)}"
        + (f"  {best.metric}={best.value:.6g} ({view.best_rule.mode})" if best else ""),
        f"  last step {view.last_step if view.last_step is not None else '-'}  ·  "
        f"goodput {view.goodput:.1%} ({view.state.steps_lost} of {view.state.steps_run} steps lost to restarts)",
    ]
    attempts = view.attempts
    if attempts:
        rows = []
        for a in attempts:
            duration = (a.ended_at - a.started_at) if a.ended_at is not None else None
            rows.append([a.epoch, a.job_id, a.status, a.resumed_from, a.first_step, a.last_step, a.steps_lost,
                         f"{a.stack} x{a.world_size}", human_duration(duration)])
        lines += ["", "attempts", render_table(
            ["epoch", "job", "status", "resumed from", "from step", "last step", "lost", "stack", "duration"], rows)]
    checkpoints = list(view.checkpoints.values())
    if checkpoints:
        protected = view.protected()
        rows = []
        for c in checkpoints:
            topo = "·".join(f"{k}{v}" for k, v in sorted(c.topology.items())) or "-"
            marks = ",".join(m for m, on in (("pinned", c.pinned),) if on)
            rows.append([c.checkpoint_id, c.step, c.status, human_bytes(c.bytes), len(c.shards),
                         f"{c.stack} x{c.world_size}", topo, protected.get(c.checkpoint_id, marks or "-")])
        lines += ["", "checkpoints", render_table(
            ["checkpoint", "step", "status", "size", "shards", "stack", "topology", "kept because"], rows)]
    if view.anomalies:
        lines += ["", f"anomalies ({len(view.anomalies)}; see `ckpt-ledger audit`)"]
        lines += [f"  {a}" for a in view.anomalies[:5]]
    return "\n".join(lines)
