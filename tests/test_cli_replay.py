"""``ckpt-ledger replay``: every event in log order, human or JSON lines; safe to pipe into ``head``."""

from __future__ import annotations

import json
import subprocess

from click.testing import CliRunner

from cli.main import cli
from ledger import Ledger
from runs import build_big_log, build_healthy_run, cli_argv, cli_env


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_json_lines_carry_envelope_and_fields(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    result = invoke("replay", info.run_dir, "--json")
    assert result.exit_code == 0
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    stored = Ledger.open(info.run_dir, read_only=True).events()
    assert [r["seq"] for r in rows] == list(range(1, len(stored) + 1))
    assert [r["tag"] for r in rows] == [s.tag for s in stored]
    commit = next(r for r in rows if r["tag"] == "checkpoint.committed")
    assert commit["checkpoint_id"] == info.committed[0] and commit["step"] == 10 and commit["epoch"] == 1
    ended = [r for r in rows if r["tag"] == "attempt.ended"]
    assert [(r["reason"], r["last_step"]) for r in ended] == [("preempted", 33), ("completed", 50)]


def test_filters(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    result = invoke("replay", info.run_dir, "--json", "--kind", "checkpoint.committed", "--kind", "attempt.ended")
    tags = [json.loads(line)["tag"] for line in result.stdout.splitlines()]
    assert tags.count("checkpoint.committed") == 5 and tags.count("attempt.ended") == 2 and len(tags) == 7
    window = invoke("replay", info.run_dir, "--from", "3", "--until", "5")
    assert [int(line.split()[0]) for line in window.stdout.splitlines()] == [3, 4, 5]
    assert invoke("replay", info.run_dir, "--from", "40", "--until", "10000").stdout.count("\n") == 3


def test_human_line_format(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    first = invoke("replay", info.run_dir).stdout.splitlines()[0]
    assert first.split()[0] == "1" and "run.started" in first and 'run_id="run"' in first


def test_head_on_a_big_log_exits_cleanly(tmp_path):
    """``replay DIR | head -1``: the reader leaves after one line; no traceback, no error exit."""
    build_big_log(tmp_path / "run", 30_000)
    for extra in ([], ["--json"]):
        proc = subprocess.Popen(cli_argv("replay", tmp_path / "run", *extra), env=cli_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        first = proc.stdout.readline()
        proc.stdout.close()  # what `head -1` does after its line
        _, err = proc.communicate(timeout=120)
        assert first.split()[0] in (b"1", b'{"seq":')
        assert err == b"", err.decode()
        assert proc.returncode == 0
    shell = subprocess.run(["bash", "-o", "pipefail", "-c", f"{' '.join(cli_argv('replay', tmp_path / 'run'))} | head -1"],
                           env=cli_env(), capture_output=True, text=True, timeout=120)
    assert shell.returncode == 0 and shell.stderr == "" and len(shell.stdout.splitlines()) == 1
