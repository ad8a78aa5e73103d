"""A real, throwaway PostgreSQL server for the tests: ``initdb`` into a temp dir, ``pg_ctl start`` on loopback.

The binaries come from Debian's ``postgresql`` package (``pg_config --bindir``, or
``CKPT_LEDGER_PG_BINDIR``); ``.ci/run`` installs it when missing. The server refuses
to run as root, so when the tests run as root every server binary runs as the
unprivileged ``nobody`` user (``subprocess``'s ``user=``/``group=``), and the data
directory is a fresh ``/tmp`` directory handed to that user.

The cluster trusts loopback connections (``--auth=trust``): it listens only on
127.0.0.1 and a private socket directory, and lives for one test session.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SUPERUSER = "ckpt"
UNPRIVILEGED_USER = "nobody"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def find_bindir() -> Path:
    """The directory holding ``initdb``/``pg_ctl``/``postgres``."""
    explicit = os.environ.get("CKPT_LEDGER_PG_BINDIR")
    candidates = [Path(explicit)] if explicit else []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found (no initdb/pg_ctl); install them with `apt-get install -y postgresql`"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster in a temp dir; :meth:`start`, :meth:`stop`, :meth:`restart`, :meth:`url`."""

    def __init__(self, *, fsync: bool = True) -> None:
        self.bindir = find_bindir()
        self.port = free_port()
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="ckpt-ledger-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.log = self.root / "server.log"
        self._as_user: dict[str, int] = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam(UNPRIVILEGED_USER)
            self._as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.sockets.mkdir()
        if self._as_user:
            os.chown(self.sockets, self._as_user["user"], self._as_user["group"])
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync",
                  "--no-instructions")

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(
            [str(self.bindir / program), *args], cwd=self.root, env=env, capture_output=True, text=True,
            check=check, timeout=120, **self._as_user,  # type: ignore[arg-type]
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
                   f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=60")
        result = self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "90",
                           "-o", options, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stdout}{result.stderr}\n{self.server_log()}")
        deadline = time.monotonic() + 30
        while self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} never became ready:\n{self.server_log()}")
            time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back open transactions; ``immediate``: like a crash)."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60", check=False)

    def restart(self) -> None:
        """Stop (fast) and start again on the same port and data."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop the server and remove its data directory."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def server_log(self) -> str:
        """The server's log so far (for failure messages)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def url(self, database: str = "postgres", run: str | None = None) -> str:
        """A ``postgresql://`` URL (no password) for ``database``, optionally naming a run."""
        url = f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"
        return f"{url}?run={run}" if run is not None else url

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        self.sql("postgres", f'CREATE DATABASE "{name}"')
        return self.url(name)

    def sql(self, database: str, statement: str, params: tuple | None = None) -> list[tuple]:
        """Run one statement as the superuser (autocommit) and return its rows."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []
