"""Shared fixtures and the Hypothesis settings profiles.

Profiles (pick with ``HYPOTHESIS_PROFILE``):

* ``ci`` (default) — modest budgets: the whole property suite runs in a minute or two on 2 cores.
* ``thorough`` — many more examples and longer stateful runs, for a local soak.

Everything touching SQLite runs with ``deadline=None``: fsync latency is not a bug.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    stateful_step_count=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory that does not exist yet (the ledger creates it)."""
    return tmp_path / "run"


def files_under(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` with its bytes (to prove an operation changed nothing)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def snapshot_files():
    """``snapshot_files(root)`` -> {relative path: bytes} of everything under ``root``."""
    return files_under


# -- injected-crash accounting (docs/reliability.md quotes these totals) --------------------

_CRASHES: dict[str, int] = {}


def count_crash(source: str, n: int = 1) -> None:
    """Record ``n`` injected crashes (SIGKILLs, abandoned handles) attributed to ``source``."""
    _CRASHES[source] = _CRASHES.get(source, 0) + n


@pytest.fixture
def crash_counter():
    """``crash_counter(source, n=1)``: count injected crashes toward the suite total."""
    return count_crash


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001 - pytest hook
    if not _CRASHES:
        return
    total = sum(_CRASHES.values())
    parts = ", ".join(f"{k} {v}" for k, v in sorted(_CRASHES.items()))
    terminalreporter.write_line(f"injected crashes: {total} ({parts})")
    out = os.environ.get("CKPT_LEDGER_CRASH_REPORT")
    if out:
        Path(out).write_text("".join(f"{k}\t{v}\n" for k, v in sorted(_CRASHES.items())) + f"total\t{total}\n")


# -- a real S3-compatible server (SeaweedFS) for the object-storage tests -------------------

@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS ``weed server -s3`` on loopback for the session (tests use fresh buckets)."""
    from s3_server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.kill()  # its data is thrown away: SIGKILL, not a graceful stop that takes SeaweedFS ~15 s


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The S3 endpoint and credentials in the standard environment variables; ``s3://BUCKET`` URL prefix."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return f"s3://{s3_server.new_bucket()}"

# -- a real PostgreSQL server (tests/pg_server.py) -------------------------------------------

@pytest.fixture(scope="session")
def pg_server():
    """One throwaway PostgreSQL server for the session; skipped only outside CI when it is not installed."""
    from pg_server import PostgresServer, PostgresUnavailable

    try:
        import psycopg  # noqa: F401 - the `postgres` extra
        server = PostgresServer()
    except (ImportError, PostgresUnavailable) as exc:
        if os.environ.get("CI"):
            raise  # CI installs both (.ci/run, `make test`): a missing one is a broken setup, not a skip
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        server.start()
        yield server
    finally:
        server.destroy()


_databases = iter(range(1, 1_000_000))


@pytest.fixture
def pg_database(pg_server) -> str:
    """The URL (no run) of a fresh, empty database on the session's server (~1 s: prefer ``pg_run_url``)."""
    return pg_server.create_database(f"t{os.getpid()}_{next(_databases)}")


@pytest.fixture(scope="session")
def pg_shared_database(pg_server) -> str:
    """The URL of one ledger database shared by the session's tests (each uses runs of its own)."""
    return pg_server.create_database(f"shared{os.getpid()}")


@pytest.fixture
def pg_run_url(pg_shared_database) -> str:
    """``postgresql://…/DB?run=NAME`` of a run no other test uses, in the session's shared database."""
    return f"{pg_shared_database}?run=t{next(_databases)}"
