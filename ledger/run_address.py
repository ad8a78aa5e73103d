"""Where a run lives: a local run directory, or a run in a PostgreSQL database.

Everything that takes a run directory also takes ``postgresql://USER@HOST:PORT/DB?run=NAME``
(``postgres://`` too). :func:`parse_run_address` tells the two apart and checks a URL:

* Passwords never appear in a URL: one in the user-info part or a ``password=``
  parameter is refused. libpq's own mechanisms supply them — ``PGPASSWORD``,
  ``~/.pgpass`` (or ``passfile=``), ``PGSERVICE`` (or ``service=``) — so nothing
  secret is ever recorded in the ledger or printed in a message.
* Only a few libpq parameters are accepted in the query (TLS files and mode,
  timeouts, service); a typo is refused instead of silently ignored.
* ``str()`` of a :class:`PostgresRun` is its canonical, password-free URL, safe to
  print and to record.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlencode, urlsplit

from ledger.errors import LedgerError

SCHEMES = ("postgresql", "postgres")

#: libpq connection parameters a run URL may carry besides ``run`` (none of them a secret).
ALLOWED_PARAMS = frozenset({
    "sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "connect_timeout", "application_name",
    "service", "passfile", "target_session_attrs", "host", "port", "user", "dbname",
})
#: Parameters that carry secrets: refused, with where the secret belongs instead.
SECRET_PARAMS = frozenset({"password", "sslpassword"})

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+=-]{0,199}")
_FORM = "postgresql://USER@HOST:PORT/DB?run=NAME"


class RunAddressError(LedgerError, ValueError):
    """A run address (URL) is malformed or carries a secret."""


@dataclass(frozen=True, slots=True)
class PostgresRun:
    """A run (or, with ``run=None``, a whole ledger database) on a PostgreSQL server."""

    dbname: str
    run: str | None = None
    user: str | None = None
    host: str | None = None
    port: int | None = None
    params: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return self.url()

    @property
    def name(self) -> str:
        """The run's name (like a run directory's ``Path.name``), or the database's when no run is named."""
        return self.run if self.run is not None else self.dbname

    def url(self, *, with_run: bool = True) -> str:
        """The canonical URL, without any password (safe to print and record)."""
        netloc = ""
        if self.host:
            netloc = f"[{self.host}]" if ":" in self.host else quote(self.host, safe="")
        if self.port is not None:
            netloc += f":{self.port}"
        if self.user:
            netloc = f"{quote(self.user, safe='')}@{netloc}"
        query = list(self.params)
        if with_run and self.run is not None:
            query.append(("run", self.run))
        text = f"postgresql://{netloc}/{quote(self.dbname, safe='')}"
        return f"{text}?{urlencode(query, safe='/:@')}" if query else text

    @property
    def database_url(self) -> str:
        """The URL of the database alone (no ``run``)."""
        return self.url(with_run=False)

    def connect_kwargs(self) -> dict[str, str | int]:
        """Keyword arguments for ``psycopg.connect``; libpq adds the password from its usual sources."""
        kwargs: dict[str, str | int] = {"dbname": self.dbname}
        if self.user:
            kwargs["user"] = self.user
        if self.host:
            kwargs["host"] = self.host
        if self.port is not None:
            kwargs["port"] = self.port
        kwargs.update(self.params)
        return kwargs

    def run_urls(self, runs: "list[str]") -> list[str]:
        """The URLs of several runs of this database (the shared part built once: listing many runs)."""
        base = self.database_url
        sep = "&" if self.params else "?"
        return [f"{base}{sep}run={quote_plus(run, safe='/:@')}" for run in runs]  # as urlencode writes it

    def for_run(self, run: str) -> "PostgresRun":
        """The same database, addressing run ``run``."""
        check_run_name(run, self.database_url)
        return PostgresRun(self.dbname, run, self.user, self.host, self.port, self.params)


def is_database_url(value: object) -> bool:
    """True when ``value`` is a string that looks like a PostgreSQL URL (not a path)."""
    return isinstance(value, str) and value.split("://", 1)[0].lower() in SCHEMES and "://" in value


def check_run_name(run: str, where: str) -> str:
    """Refuse an empty or odd run name (printable ASCII, at most 200 characters)."""
    if not _RUN_NAME.fullmatch(run):
        raise RunAddressError(
            f"run name {run!r} in {where} is not valid; use 1-200 letters, digits and . _ / : @ + = - "
            "(starting with a letter or digit)"
        )
    return run


def _redacted(value: str) -> str:
    """``value`` with any password in its user-info part replaced (for error messages)."""
    scheme, sep, rest = value.partition("://")
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    tail = re.sub(r"((?:^|[?&])(?:ssl)?password=)[^&]*", r"\1***", tail)
    return f"{scheme}{sep}{netloc}{slash}{tail}"


def parse_postgres_url(value: str, *, require_run: bool = True) -> PostgresRun:
    """Parse and check ``postgresql://USER@HOST:PORT/DB?run=NAME``; raises :class:`RunAddressError`."""
    shown = _redacted(value)
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise RunAddressError(f"{shown} is not a valid PostgreSQL URL ({exc}); use {_FORM}") from None
    if parts.password is not None:
        raise RunAddressError(
            f"{shown} contains a password; remove it from the URL and give it through PGPASSWORD, "
            "~/.pgpass or PGSERVICE (a URL may end up in logs and the ledger)"
        )
    if parts.fragment:
        raise RunAddressError(f"{shown} has a '#' fragment; use {_FORM}")
    dbname = unquote(parts.path.lstrip("/"))
    run: str | None = None
    params: list[tuple[str, str]] = []
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise RunAddressError(f"{shown} has a malformed query string; use {_FORM}") from None
    for key, val in query:
        if key in SECRET_PARAMS:
            raise RunAddressError(
                f"{shown} carries {key}=; secrets never go in a URL: use PGPASSWORD, ~/.pgpass or PGSERVICE"
            )
        if key == "run":
            if run is not None:
                raise RunAddressError(f"{shown} names run= twice; give one run")
            run = check_run_name(val, shown)
        elif key == "dbname" and not dbname:
            dbname = val
        elif key in ALLOWED_PARAMS and key != "dbname":
            params.append((key, val))
        else:
            raise RunAddressError(
                f"{shown}: unknown parameter {key!r}; allowed are run and {', '.join(sorted(ALLOWED_PARAMS))}"
            )
    if not dbname or "/" in dbname:
        raise RunAddressError(f"{shown} does not name one database; use {_FORM}")
    if require_run and run is None:
        raise RunAddressError(f"{shown} names no run; add ?run=NAME (e.g. {_FORM})")
    user = unquote(parts.username) if parts.username else None
    host = unquote(parts.hostname) if parts.hostname else None
    return PostgresRun(dbname=dbname, run=run, user=user, host=host, port=port, params=tuple(params))


def parse_run_address(value: str | os.PathLike[str] | PostgresRun, *, require_run: bool = True) -> Path | PostgresRun:
    """A run directory as a :class:`~pathlib.Path`, or a PostgreSQL run as a :class:`PostgresRun`."""
    if isinstance(value, PostgresRun):
        if require_run and value.run is None:
            raise RunAddressError(f"{value} names no run; add ?run=NAME")
        return value
    if is_database_url(value):
        return parse_postgres_url(value, require_run=require_run)  # type: ignore[arg-type]
    text = os.fspath(value)
    if isinstance(text, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        scheme = text.split("://", 1)[0]
        raise RunAddressError(
            f"{_redacted(text)}: a run is a local directory or {_FORM}, not a {scheme}:// URL "
            "(object stores hold blobs: pass them with --blobs)"
        )
    return Path(text)
