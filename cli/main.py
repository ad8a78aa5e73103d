"""The ``ckpt-ledger`` click group and its entry point.

Library errors are translated to one-line messages and the contract's exit codes
in :class:`LedgerGroup`, once, for every command.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

import click

from cli.errors import EXIT_USAGE, CliError, translate
from cli.options import debug_enabled
from ledger.errors import LedgerError


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # stdout has no file descriptor (e.g. under a test runner): nothing left to flush
    finally:
        os.close(devnull)


class LedgerGroup(click.Group):
    """A click group that turns library errors into one-line messages with contract exit codes."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except (LedgerError, ValueError, OSError) as exc:
            if isinstance(exc, BrokenPipeError) or getattr(exc, "errno", None) == errno.EPIPE:
                # `ckpt-ledger replay DIR | head -1`: the reader left. Exit quietly like other Unix
                # tools (click would exit 1); stdout goes to /dev/null so the final flush cannot fail.
                _silence_stdout()
                raise click.exceptions.Exit(0) from None
            if debug_enabled():
                traceback.print_exc()
            raise translate(exc) from exc


@click.group(cls=LedgerGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ckpt-ledger", prog_name="ckpt-ledger")
def cli() -> None:
    """ckpt-ledger: an event-sourced checkpoint and state store for PyTorch training.

    Every lifecycle fact of a run is an event in RUN_DIR/ledger.db; resume,
    retention, best and latest are decided from the log alone.

    \b
    Example:
      ckpt-ledger train --run-dir runs/exp1 --stack fsdp --nproc 2
      ckpt-ledger inspect runs/exp1
    """


def _register() -> None:
    # Imported here so that `cli` exists before commands attach to it.
    from cli.alias_cmd import alias_command, unalias_command
    from cli.attempt_cmd import end_attempt_command
    from cli.audit_cmd import audit_command
    from cli.gc_cmd import gc_command
    from cli.inspect_cmd import inspect_command
    from cli.pin_cmd import pin_command, unpin_command
    from cli.replay_cmd import replay_command
    from cli.tail_cmd import tail_command
    from cli.timeline_cmd import timeline_command

    for command in (inspect_command, replay_command, audit_command, gc_command, tail_command, pin_command,
                    unpin_command, timeline_command, alias_command, unalias_command, end_attempt_command):
        cli.add_command(command)
    from cli.train_cmd import train_command
    cli.add_command(train_command)
    from cli.export_cmd import export_command
    cli.add_command(export_command)
    from cli.runs_cmd import runs_command
    cli.add_command(runs_command)


_register()


def main() -> None:
    """Console-script entry point (``ckpt-ledger``)."""
    try:
        # Without standalone mode, click *returns* the code of ctx.exit(n) instead of exiting.
        code = cli.main(prog_name="ckpt-ledger", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except CliError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        # Usage errors: one line, with where to read more.
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        message = " ".join(exc.format_message().split())
        click.echo(f"ckpt-ledger: error: {message}{hint}", err=True)
        sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
    except BrokenPipeError:
        # `ckpt-ledger replay DIR | head`: the reader left; exit quietly like other Unix tools.
        _silence_stdout()
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(130)
