"""``ckpt-ledger audit``: a post-mortem of a run — crashes, torn saves, stray and missing files, a damaged ledger."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cli.errors import EXIT_PROBLEM
from cli.options import json_option, open_read_only, run_dir_argument
from ledger.audit import AuditReport, Progress, audit


def _progress_bar(enabled: bool) -> tuple[Progress | None, list]:
    """A callback drawing a click progress bar on stderr (only on a terminal), and the bar holder to close."""
    holder: list = []
    if not enabled:
        return None, holder

    def update(done: int, total: int) -> None:
        if not holder:
            holder.append(click.progressbar(length=max(total, 1), label="verifying shard hashes", file=sys.stderr))
            holder[0].__enter__()
            holder.append(0)
        bar = holder[0]
        bar.update(done - holder[1])
        holder[1] = done

    return update, holder


def render_report(report: AuditReport) -> str:
    """The human form of ``audit``."""
    problems, notes = report.problems, report.notes
    checked = report.checked
    head = (f"audit of {report.run_dir} as of event {report.seq}: "
            f"{len(problems)} problem(s), {len(notes)} note(s)  "
            f"[{checked.get('attempts', 0)} attempts, {checked.get('checkpoints', 0)} checkpoints, "
            f"{checked.get('shards', 0)} committed shards, {checked.get('files', 0)} blob files"
            + (f", {checked['bytes_hashed']} bytes re-hashed" if "bytes_hashed" in checked else "") + "]")
    lines = [head]
    for label, items in (("PROBLEM", problems), ("note", notes)):
        for f in items:
            lines.append(f"{label:<8} {f.kind:<22} {f.subject}: {f.message}")
            if f.fix:
                lines.append(f"{'':<8} {'':<22} fix: {f.fix}")
    lines.append("healthy" if report.healthy else f"{len(problems)} problem(s) found; each says what to do")
    return "\n".join(lines)


@click.command("audit")
@run_dir_argument
@json_option
@click.option("--verify-blobs", is_flag=True, help="Re-hash every shard of every committed checkpoint (slow).")
@click.pass_context
def audit_command(ctx: click.Context, run_dir: Path, as_json: bool, verify_blobs: bool) -> None:
    """Post-mortem of a run: crashed attempts, torn saves, stray, missing or damaged files, ledger integrity.

    Read-only: changes neither the ledger nor any file. Exits 0 when healthy,
    1 when problems were found (each with what to do), 2 when the ledger is unreadable.

    \b
    Examples:
      ckpt-ledger audit runs/exp1
      ckpt-ledger audit runs/exp1 --verify-blobs      # also re-hash every shard
      ckpt-ledger audit runs/exp1 --json | jq '.findings[] | select(.severity == "problem")'
    """
    progress, bar = _progress_bar(verify_blobs and sys.stderr.isatty())
    with open_read_only(run_dir) as led:
        try:
            report = audit(led, verify_blobs=verify_blobs, progress=progress)
        finally:
            if bar:
                bar[0].__exit__(None, None, None)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(render_report(report))
    if not report.healthy:
        ctx.exit(EXIT_PROBLEM)
