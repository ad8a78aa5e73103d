"""Run addresses: a directory or ``postgresql://USER@HOST:PORT/DB?run=NAME``, never with a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.run_address import (
    PostgresRun,
    RunAddressError,
    is_database_url,
    parse_postgres_url,
    parse_run_address,
)


def test_paths_stay_paths() -> None:
    assert parse_run_address("runs/exp1") == Path("runs/exp1")
    assert parse_run_address(Path("/tmp/x")) == Path("/tmp/x")
    assert parse_run_address("postgresql-runs/exp1") == Path("postgresql-runs/exp1")
    assert not is_database_url("runs/postgresql://x")


def test_full_url_parses_into_parts() -> None:
    run = parse_run_address("postgresql://alice@db.example:6543/ledger?run=r1")
    assert run == PostgresRun(dbname="ledger", run="r1", user="alice", host="db.example", port=6543)
    assert run.connect_kwargs() == {"dbname": "ledger", "user": "alice", "host": "db.example", "port": 6543}
    assert str(run) == "postgresql://alice@db.example:6543/ledger?run=r1"
    assert run.database_url == "postgresql://alice@db.example:6543/ledger"


def test_postgres_scheme_alias_and_canonical_form() -> None:
    run = parse_run_address("postgres://db/ledger?sslmode=require&run=team/exp-1")
    assert isinstance(run, PostgresRun)
    assert run.host == "db" and run.user is None and run.port is None
    assert run.params == (("sslmode", "require"),)
    assert run.connect_kwargs()["sslmode"] == "require"
    # The canonical form round-trips.
    assert parse_run_address(str(run)) == run


def test_unix_socket_and_ipv6_hosts_round_trip() -> None:
    sock = parse_postgres_url("postgresql://u@%2Fvar%2Frun%2Fpostgresql/ledger?run=a")
    assert sock.host == "/var/run/postgresql"
    assert parse_postgres_url(str(sock)) == sock
    v6 = parse_postgres_url("postgresql://u@[::1]:5432/ledger?run=a")
    assert v6.host == "::1"
    assert parse_postgres_url(str(v6)) == v6


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://alice:s3cret-pw@db:5432/ledger?run=r1",
        "postgresql://alice:@db:5432/ledger?run=r1",
        "postgresql://alice@db:5432/ledger?run=r1&password=s3cret-pw",
        "postgresql://alice@db:5432/ledger?sslpassword=s3cret-pw&run=r1",
    ],
)
def test_a_password_is_refused_and_never_echoed(url: str) -> None:
    with pytest.raises(RunAddressError) as info:
        parse_run_address(url)
    message = str(info.value)
    assert "s3cret-pw" not in message
    assert "PGPASSWORD" in message and "\n" not in message


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://db:5432/?run=r1", "does not name one database"),
        ("postgresql://db:5432/ledger", "names no run"),
        ("postgresql://db:5432/ledger?run=", "not valid"),
        ("postgresql://db:5432/ledger?run=a&run=b", "twice"),
        ("postgresql://db:5432/ledger?run=r1&sslmod=require", "unknown parameter 'sslmod'"),
        ("postgresql://db:notaport/ledger?run=r1", "not a valid PostgreSQL URL"),
        ("postgresql://db/ledger?run=r1#frag", "fragment"),
        ("postgresql://db/ledger?run=..%0a", "not valid"),
        ("s3://bucket/prefix", "not a s3:// URL"),
    ],
)
def test_bad_urls_get_one_line_errors(url: str, says: str) -> None:
    with pytest.raises(RunAddressError, match=says) as info:
        parse_run_address(url)
    assert "\n" not in str(info.value)


def test_a_database_url_without_run_when_allowed() -> None:
    db = parse_run_address("postgresql://u@h/ledger", require_run=False)
    assert isinstance(db, PostgresRun) and db.run is None
    assert db.for_run("r2").run == "r2"
    assert db.run_urls(["r2", "team/a b"]) == [str(db.for_run("r2")), "postgresql://u@h/ledger?run=team/a+b"]
    with_params = parse_run_address("postgresql://u@h/ledger?sslmode=require", require_run=False)
    assert with_params.run_urls(["r2"]) == [str(with_params.for_run("r2"))]
    with pytest.raises(RunAddressError):
        db.for_run("bad name with spaces")


def test_trainer_config_refuses_a_run_url_with_a_password() -> None:
    from trainer.config import TrainerConfig

    with pytest.raises(ValueError, match="PGPASSWORD") as info:
        TrainerConfig(run_dir="postgresql://alice:s3cret-pw@db/ledger?run=r1")
    assert "s3cret-pw" not in str(info.value)
    assert TrainerConfig(run_dir="postgresql://alice@db/ledger?run=r1").run_dir.endswith("?run=r1")
