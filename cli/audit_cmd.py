"""``ckpt-ledger audit``: a post-mortem of a run — crashes, torn saves, stray and missing files, a damaged ledger."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.errors import EXIT_PROBLEM
from cli.options import json_option, open_read_only, run_dir_argument
from ledger.audit import AuditReport, audit
from ledger.progress import byte_progress, wanted


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

    Read-only: changes neither the ledger nor any file. The shards are checked wherever
    the run keeps them (a directory or object storage, as recorded when it started);
    --verify-blobs streams every one through its hash. Exits 0 when healthy,
    1 when problems were found (each with what to do), 2 when the ledger is unreadable.

    \b
    Examples:
      ckpt-ledger audit runs/exp1
      ckpt-ledger audit runs/exp1 --verify-blobs      # also re-hash every shard
      ckpt-ledger audit runs/exp1 --json | jq '.findings[] | select(.severity == "problem")'
    """
    with open_read_only(run_dir) as led, \
            byte_progress("verifying shard hashes", verify_blobs and wanted(as_json)) as progress:
        report = audit(led, verify_blobs=verify_blobs, progress=progress)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(render_report(report))
    if not report.healthy:
        ctx.exit(EXIT_PROBLEM)
