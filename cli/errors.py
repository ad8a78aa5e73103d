"""Library errors become exit codes and one-line messages here, and only here."""

from __future__ import annotations

import click

from ledger.errors import (
    CheckpointNotFoundError,
    CorruptLedgerError,
    FencedError,
    LedgerError,
    LedgerNotFoundError,
    LedgerUnavailableError,
    SchemaTooNewError,
)

EXIT_OK = 0
EXIT_PROBLEM = 1  # audit found problems, or the ledger says the request cannot be done
EXIT_USAGE = 2  # bad input; missing, unreadable, corrupt or too-new ledger
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: preempted and saved, requeue me


class CliError(click.ClickException):
    """A one-line error with a chosen exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:  # noqa: ANN001 - click's signature
        click.echo(f"ckpt-ledger: error: {self.format_message()}", err=True)


def exit_code_for(exc: LedgerError | ValueError | OSError) -> int:
    """The contract's exit code for a library error."""
    if isinstance(exc, (LedgerNotFoundError, CorruptLedgerError, SchemaTooNewError, LedgerUnavailableError)):
        return EXIT_USAGE
    if isinstance(exc, (CheckpointNotFoundError, FencedError, LedgerError)):
        return EXIT_PROBLEM
    return EXIT_USAGE


def translate(exc: BaseException) -> CliError:
    """Turn a library or OS error into the CLI's one-line form."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return CliError(message, exit_code_for(exc))  # type: ignore[arg-type]
