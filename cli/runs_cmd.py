"""``ckpt-ledger runs``: every run of a PostgreSQL ledger database, one line each."""

from __future__ import annotations

import json

import click

from cli.options import json_option
from cli.tables import render_table
from ledger.run_address import PostgresRun, RunAddressError, parse_run_address
from ledger.run_list import list_runs


class DatabaseUrlType(click.ParamType):
    """``postgresql://USER@HOST:PORT/DB`` (an optional ``?run=NAME`` lists that run alone)."""

    name = "URL"

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            address = parse_run_address(str(value), require_run=False)
        except RunAddressError as exc:
            self.fail(str(exc), param, ctx)
        if not isinstance(address, PostgresRun):
            self.fail(f"{value} is not a database URL; `runs` lists the runs of postgresql://USER@HOST:PORT/DB "
                      "(a run directory holds one run: use `ckpt-ledger inspect DIR`)", param, ctx)
        return address


@click.command("runs")
@click.argument("database", metavar="URL", type=DatabaseUrlType())
@json_option
def runs_command(database: PostgresRun, as_json: bool) -> None:
    """List the runs of a PostgreSQL ledger database: name, last step, resume target, status, goodput.

    Read-only: opens a read-only transaction and never writes. Passwords come from
    PGPASSWORD, ~/.pgpass or PGSERVICE, never from the URL.

    \b
    Examples:
      ckpt-ledger runs postgresql://alice@db.example:5432/ledger
      ckpt-ledger runs postgresql://alice@db.example:5432/ledger --json | jq '.runs[].resume'
      ckpt-ledger inspect 'postgresql://alice@db.example:5432/ledger?run=exp1'
    """
    summaries = [s for s in list_runs(database) if database.run is None or s.run == database.run]
    if as_json:
        click.echo(json.dumps({"database": database.database_url, "runs": [s.to_dict() for s in summaries]},
                              indent=2))
        return
    if not summaries:
        click.echo(f"no runs in {database.database_url}")
        return
    rows = [(s.run, s.last_step, f"{s.resume['checkpoint_id']} (step {s.resume['step']})" if s.resume else None,
             s.status, f"{s.goodput:.1%}", s.attempts) for s in summaries]
    click.echo(f"{len(summaries)} run(s) in {database.database_url}")
    click.echo(render_table(["RUN", "LAST STEP", "RESUME", "STATUS", "GOODPUT", "ATTEMPTS"], rows))
