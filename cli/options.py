"""Option and argument decorators shared by commands, and opening a run read-only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import click

from cli.errors import EXIT_USAGE, CliError
from ledger import LEDGER_FILE, Ledger
from ledger.run_address import PostgresRun, RunAddressError, parse_run_address

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")

class SeqType(click.ParamType):
    """A log sequence number: a non-negative integer."""

    name = "SEQ"

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 - click's signature
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip(), 10)
            except ValueError:
                self.fail(f"{value!r} is not a sequence number; give a whole number >= 0",
                          param, ctx)
        if number < 0:
            self.fail(f"{number} is negative; sequence numbers start at 1 (0 means before the first event)", param, ctx)
        return number


seq_type = SeqType()


class RunAddressType(click.ParamType):
    """A run: a directory (``Path``) or ``postgresql://USER@HOST:PORT/DB?run=NAME`` (:class:`PostgresRun`)."""

    name = "DIR"

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 - click's signature
        if isinstance(value, (Path, PostgresRun)):
            return value
        try:
            return parse_run_address(str(value))
        except RunAddressError as exc:
            self.fail(str(exc), param, ctx)


run_address_type = RunAddressType()


def run_dir_argument(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The ``DIR`` positional argument: a run directory holding ledger.db, or a PostgreSQL run URL."""
    return click.argument("run_dir", metavar="DIR", type=run_address_type)(fn)


def check_run_dir(run_dir: Path | PostgresRun) -> Path | PostgresRun:
    """Refuse a path that is not an existing run directory, with the fix in the message.

    A PostgreSQL run is checked when it is opened (the server says whether it exists).
    """
    if isinstance(run_dir, PostgresRun):
        return run_dir
    if not run_dir.exists():
        raise CliError(f"run directory {run_dir} does not exist; pass the --run-dir used for `ckpt-ledger train`", EXIT_USAGE)
    if not run_dir.is_dir():
        raise CliError(f"{run_dir} is a file, not a run directory; pass the directory that contains {LEDGER_FILE}", EXIT_USAGE)
    if not (run_dir / LEDGER_FILE).exists():
        raise CliError(f"{run_dir} has no {LEDGER_FILE}; it is not a ckpt-ledger run directory", EXIT_USAGE)
    return run_dir


def open_read_only(run_dir: Path | PostgresRun) -> Ledger:
    """Open a run's ledger without creating or changing any file."""
    return Ledger.open(check_run_dir(run_dir), read_only=True)


def debug_enabled() -> bool:
    """``CKPT_LEDGER_DEBUG=1`` shows tracebacks instead of one-line errors."""
    return os.environ.get("CKPT_LEDGER_DEBUG", "") not in ("", "0")


def duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """Click callback: a duration (``3600``, ``30m``, ``6h``, ``7d``) in seconds, or ``None`` when not given."""
    if value is None:
        return None
    from ledger.time_retention import parse_duration

    try:
        return parse_duration(value, name=f"--{param.name.replace('_', '-')}")
    except ValueError as err:
        raise click.BadParameter(str(err), ctx, param) from None
