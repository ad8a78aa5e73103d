"""Bad input everywhere: the contract's exit code, ONE line on stderr naming the problem, no traceback,
and not a single byte of any file created or changed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ledger.store import raw

from runs import build_healthy_run, cli_argv, cli_env, run_main, snapshot_tree


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Every kind of bad run directory next to a good one, plus a place for outputs."""
    root = tmp_path_factory.mktemp("bad")
    build_healthy_run(root / "ok")
    (root / "nodb").mkdir()
    (root / "afile").write_text("not a run directory\n")
    (root / "empty").mkdir()
    (root / "empty" / "ledger.db").write_bytes(b"")
    (root / "junk").mkdir()
    (root / "junk" / "ledger.db").write_bytes(bytes(range(256)) * 40)
    (root / "foreign").mkdir()
    conn = raw.connect(root / "foreign" / "ledger.db")
    conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, tag TEXT)")
    conn.commit()
    conn.close()
    (root / "dirdb" / "ledger.db").mkdir(parents=True)
    build_healthy_run(root / "newer")
    conn = raw.connect(root / "newer" / "ledger.db")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    build_healthy_run(root / "unknowntag")
    conn = raw.connect(root / "unknowntag" / "ledger.db")
    conn.execute("INSERT INTO events (seq, event_id, epoch, recorded_at, tag, schema_version, payload) "
                 "VALUES (43, 'x', 2, 0, 'model.exploded', 1, '{}')")
    conn.commit()
    conn.close()
    (root / "out").mkdir()
    (root / "out" / "pic.png").mkdir()
    (root / "out" / "afile").write_text("x")
    for path in root.rglob("*-wal"):
        raise AssertionError(f"fixture left a WAL behind: {path}")
    return root


# (argv with {placeholders} under the world root, exit code, a word the one-line message must contain)
CASES = [
    (["inspect", "{root}/missing"], 2, "does not exist"),
    (["inspect", "{root}/afile"], 2, "not a run directory"),
    (["inspect", "{root}/nodb"], 2, "no ledger.db"),
    (["inspect", "{root}/foreign"], 2, "not a ckpt-ledger ledger"),
    (["inspect", "{root}/empty"], 2, "empty"),
    (["inspect", "{root}/junk"], 2, "not a readable"),
    (["inspect", "{root}/dirdb"], 2, "directory"),
    (["inspect", "{root}/newer"], 2, "upgrade"),
    (["inspect", "{root}/ok", "--at", "-1"], 2, "negative"),
    (["inspect", "{root}/ok", "--at", "abc"], 2, "not a sequence number"),
    (["inspect", "{root}/ok", "--at", "100000"], 2, "past the end"),
    (["inspect"], 2, "Missing argument"),
    (["replay", "{root}/ok", "--from", "9", "--until", "3"], 2, "swap them"),
    (["replay", "{root}/ok", "--from", "1.5"], 2, "not a sequence number"),
    (["replay", "{root}/ok", "--kind", "model.exploded"], 2, "unknown event tag"),
    (["replay", "{root}/unknowntag"], 2, "seq 43"),
    (["replay", "{root}/junk", "--json"], 2, "not a readable"),
    (["audit", "{root}/empty"], 2, "empty"),
    (["audit", "{root}/foreign", "--verify-blobs"], 2, "not a ckpt-ledger ledger"),
    (["audit", "{root}/ok", "--verify"], 2, "No such option"),
    (["gc", "{root}/foreign"], 2, "not a ckpt-ledger ledger"),
    (["gc", "{root}/nodb"], 2, "no ledger.db"),
    (["gc", "{root}/empty", "--dry-run"], 2, "empty"),
    (["gc", "{root}/newer"], 2, "upgrade"),
    (["gc", "{root}/ok", "--keep-last", "-1"], 2, "--keep-last"),
    (["gc", "{root}/ok", "--keep-every", "0"], 2, "--keep-every"),
    (["pin", "{root}/ok", "step999999-e9"], 1, "no checkpoint"),
    (["unpin", "{root}/ok", "nope"], 1, "no checkpoint"),
    (["pin", "{root}/missing", "x"], 2, "does not exist"),
    (["pin", "{root}/foreign", "x"], 2, "not a ckpt-ledger ledger"),
    (["pin", "{root}/ok"], 2, "Missing argument"),
    (["tail", "{root}/missing"], 2, "does not exist"),
    (["tail", "{root}/ok", "-n", "-1"], 2, "--lines"),
    (["timeline", "{root}/ok", "--out", "{root}/out/run.jpg"], 2, "unsupported extension"),
    (["timeline", "{root}/ok", "--out", "{root}/out/noext"], 2, "unsupported extension"),
    (["timeline", "{root}/ok", "--out", "{root}/out/missing/run.png"], 2, "does not exist"),
    (["timeline", "{root}/ok", "--out", "{root}/out/pic.png"], 2, "is a directory"),
    (["timeline", "{root}/ok", "--out", "{root}/out/afile/run.png"], 2, "does not exist"),
    (["timeline", "{root}/ok", "--out", "/proc/ckpt-ledger-run.svg"], 2, "could not write"),
    (["timeline", "{root}/ok"], 2, "--out"),
    (["timeline", "{root}/missing", "--out", "{root}/out/run.png"], 2, "does not exist"),
    (["no-such-command"], 2, "No such command"),
]


@pytest.mark.parametrize(("argv", "code", "word"), CASES, ids=[" ".join(c[0]).replace("{root}/", "") for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, capsys, monkeypatch, argv, code, word):
    monkeypatch.delenv("CKPT_LEDGER_DEBUG", raising=False)
    before = snapshot_tree(world)
    got, _out, err = run_main([a.format(root=world) for a in argv], capsys)
    assert got == code, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    assert lines[0].startswith("ckpt-ledger: error: ") and word in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot_tree(world) == before, "a failed command created or changed a file"


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("argv", [["inspect", "{root}/foreign"], ["pin", "{root}/ok", "nope"],
                                  ["replay", "{root}/ok", "--from", "x"]])
def test_real_process_prints_one_line(world, argv):
    """The same contract from a real ``python -m cli`` process (what users and scripts see)."""
    before = snapshot_tree(world)
    proc = subprocess.run(cli_argv(*[a.format(root=world) for a in argv]), env=cli_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode in (1, 2)
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert snapshot_tree(world) == before


def test_debug_env_shows_the_traceback(world):
    proc = subprocess.run(cli_argv("inspect", world / "foreign"), env=cli_env(CKPT_LEDGER_DEBUG="1"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "CorruptLedgerError" in proc.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out_directory(world, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run_main(["timeline", world / "ok", "--out", locked / "run.png"], capsys)
        assert code == 2 and "not writable" in err and len(err.splitlines()) == 1
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
