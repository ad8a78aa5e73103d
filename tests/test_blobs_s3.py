"""The object-storage blob store against a real S3 server (SeaweedFS): atomic uploads, hashes, listings.

No mocks: every test talks to ``weed server -s3`` on loopback through s3fs, with the
credentials in the standard environment variables only.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
import xxhash

from ledger import CorruptBlobError, Ledger, LedgerError
from ledger.blobs import blob_store_for, parse_location
from ledger.blobs_remote import FsspecBlobStore, check_blob_url
from s3_server import ACCESS_KEY, SECRET_KEY

MiB = 1 << 20


def xxh(data: bytes) -> str:
    return f"xxh3-128:{xxhash.xxh3_128(data).hexdigest()}"


@pytest.fixture
def store(s3_env) -> FsspecBlobStore:
    found = blob_store_for(f"{s3_env}/runs/exp1", "/nonexistent-run-dir")
    assert isinstance(found, FsspecBlobStore)
    found.part_bytes = 5 * MiB  # S3's smallest part: several parts from a modest blob
    return found


def test_small_blob_is_one_put_hashed_while_written(store, s3_server, s3_env):
    data = os.urandom(300_000)
    info = store.write("blobs/ck1/e1/rank0.bin", data)
    assert info.hash == xxh(data) and info.bytes == len(data)
    # The object really is where the URL says, as the server sees it.
    assert s3_server.client().cat_file(f"{s3_env[5:]}/runs/exp1/blobs/ck1/e1/rank0.bin") == data
    assert store.read("blobs/ck1/e1/rank0.bin", expected_hash=info.hash) == data
    assert store.size("blobs/ck1/e1/rank0.bin") == len(data)
    assert store.hash_file("blobs/ck1/e1/rank0.bin") == (info.hash, len(data))


def test_large_blob_is_a_multipart_upload_in_uneven_writes(store):
    data = os.urandom(17 * MiB + 12345)
    with store.open_atomic("blobs/ck1/e1/big.distcp") as sink:
        # Writes that straddle part boundaries, one larger than a part, one tiny.
        for start, end in ((0, 3 * MiB), (3 * MiB, 3 * MiB + 7), (3 * MiB + 7, 14 * MiB), (14 * MiB, len(data))):
            sink.write(memoryview(data)[start:end])
    assert sink.hash == xxh(data) and sink.size == len(data)
    assert store.hash_file("blobs/ck1/e1/big.distcp") == (xxh(data), len(data))
    with store.open_read("blobs/ck1/e1/big.distcp") as fh:  # seekable, ranged reads
        fh.seek(9 * MiB + 3)
        assert fh.read(100) == data[9 * MiB + 3: 9 * MiB + 103]
    assert store.unfinished_uploads() == []


@pytest.mark.parametrize("size", [1000, 12 * MiB])
def test_a_failed_write_leaves_nothing_visible_and_no_upload(store, size):
    with pytest.raises(RuntimeError, match="writer died"):
        with store.open_atomic("blobs/ck2/e1/rank0.bin") as sink:
            sink.write(os.urandom(size))
            raise RuntimeError("writer died")
    assert store.size("blobs/ck2/e1/rank0.bin") is None
    assert list(store.list_files()) == []
    assert store.unfinished_uploads() == []


def test_a_killed_writers_upload_is_invisible_until_aborted(store):
    sink = store.open_atomic("blobs/ck3/e2/rank1.distcp")
    sink.__enter__()
    sink.write(os.urandom(11 * MiB))  # two parts sent, never completed: the writer "died" here
    sink._collect_one()
    sink._collect_one()
    assert store.size("blobs/ck3/e2/rank1.distcp") is None
    assert list(store.list_files()) == []
    assert store.unfinished_uploads() == ["blobs/ck3/e2/rank1.distcp"]
    store.abort_uploads("blobs/ck3/e2/rank1.distcp")
    assert store.unfinished_uploads() == []


def test_verify_is_the_one_check_missing_and_flipped(store, s3_server, s3_env):
    data = os.urandom(2 * MiB)
    info = store.write("blobs/ck4/e1/rank0.bin", data)
    store.verify(info.location, info.hash, info.bytes)
    seen = []
    store.verify(info.location, info.hash, info.bytes, progress=seen.append)
    assert seen and seen[-1] == len(data)
    flipped = bytearray(data)
    flipped[12345] ^= 0x01
    s3_server.client().pipe_file(f"{s3_env[5:]}/runs/exp1/{info.location}", bytes(flipped))
    with pytest.raises(CorruptBlobError) as bad:
        store.verify(info.location, info.hash, info.bytes)
    assert bad.value.found_hash == xxh(bytes(flipped))
    store.delete(info.location)
    store.delete(info.location)  # already gone: no error
    with pytest.raises(CorruptBlobError, match="missing") as gone:
        store.verify(info.location, info.hash, info.bytes)
    assert gone.value.found_hash is None


def test_list_files_gives_locations_relative_to_the_url(store):
    for loc in ("blobs/a/e1/x.bin", "blobs/a/e1/y.bin", "blobs/b/e2/.metadata"):
        store.write(loc, b"payload")
    assert sorted(store.list_files()) == ["blobs/a/e1/x.bin", "blobs/a/e1/y.bin", "blobs/b/e2/.metadata"]
    assert parse_location("blobs/b/e2/.metadata") == ("b", 2, ".metadata")
    assert parse_location("notes/readme") is None


@pytest.mark.parametrize("url", [
    f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/prefix",
    f"s3://{ACCESS_KEY}@bucket/prefix",
    f"s3://bucket/prefix?secret_access_key={SECRET_KEY}",
])
def test_a_url_with_credentials_is_refused_without_repeating_them(url):
    with pytest.raises(ValueError) as refused:
        check_blob_url(url)
    message = str(refused.value)
    assert "\n" not in message and SECRET_KEY not in message and ACCESS_KEY not in message
    assert "AWS_ACCESS_KEY_ID" in message


def test_wrong_credentials_are_an_error_not_an_empty_store(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = blob_store_for(f"{s3_env}/p", "/nonexistent-run-dir")
    with pytest.raises(LedgerError):
        list(store.list_files())


def test_the_ledger_finds_its_blobs_from_run_started(tmp_path, s3_env):
    url = f"{s3_env}/team/run7"
    with Ledger.open(tmp_path / "run") as led:
        led.start_run(run_id="r7", config={}, blobs=url)
        led.blobs.write("blobs/c/e1/r0.bin", b"abc")
    with Ledger.open(tmp_path / "run", read_only=True) as ro:
        assert isinstance(ro.blobs, FsspecBlobStore) and ro.blobs.url == url
        assert list(ro.blobs.list_files()) == ["blobs/c/e1/r0.bin"]
    assert not (tmp_path / "run" / "blobs").exists()


def test_start_run_refuses_to_record_credentials(tmp_path):
    with Ledger.open(tmp_path / "run") as led:
        with pytest.raises(ValueError, match="embeds credentials"):
            led.start_run(run_id="r", config={}, blobs=f"s3://{ACCESS_KEY}:{SECRET_KEY}@b/p")
        assert led.max_seq() == 0


def _dead_attempt_with_an_unfinished_upload(run_dir, url) -> str:
    """A run on S3 whose first attempt died mid-upload (a multipart upload begun, never completed)."""
    from ledger.events import AttemptEnded

    with Ledger.open(run_dir) as led:
        led.start_run(run_id="r", config={}, blobs=url)
        attempt = led.begin_attempt(world_size=1, stack="ddp")
        led.begin_checkpoint(checkpoint_id="step000010-e1", step=10, ranks=[0], world_size=1, stack="ddp",
                             epoch=attempt.epoch)
        location = f"{led.blobs.checkpoint_dir('step000010-e1', attempt.epoch)}/__0_0.distcp"
        led.blobs.part_bytes = 5 * MiB
        sink = led.blobs.open_atomic(location)
        sink.write(os.urandom(6 * MiB))  # one part sent; the writer "dies" before completing
        sink._collect_one()
        led.append(AttemptEnded(epoch=attempt.epoch, reason="failed", last_step=10), epoch=attempt.epoch)
    return location


def test_gc_aborts_the_unfinished_upload_of_a_dead_attempt(tmp_path, s3_env):
    from click.testing import CliRunner

    from cli.main import cli

    run_dir = tmp_path / "run"
    location = _dead_attempt_with_an_unfinished_upload(run_dir, f"{s3_env}/exp")
    audit = CliRunner().invoke(cli, ["audit", str(run_dir), "--json"])
    assert audit.exit_code == 1
    strays = [f for f in json.loads(audit.stdout)["findings"] if f["kind"] == "stray_upload"]
    assert [f["subject"] for f in strays] == [location] and "gc" in strays[0]["fix"]
    dry = CliRunner().invoke(cli, ["gc", str(run_dir), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert [(f["location"], f["upload"]) for f in json.loads(dry.stdout)["files"]] == [(location, True)]
    with Ledger.open(run_dir, read_only=True) as ro:
        assert ro.blobs.unfinished_uploads() == [location]  # the dry run aborted nothing
    done = CliRunner().invoke(cli, ["gc", str(run_dir)])
    assert done.exit_code == 0, done.output
    with Ledger.open(run_dir, read_only=True) as ro:
        assert ro.blobs.unfinished_uploads() == []
    assert CliRunner().invoke(cli, ["audit", str(run_dir)]).exit_code == 0


def _stderr_on_a_terminal(argv: list[str]) -> tuple[int, str]:
    """Run ``python -m cli ARGV`` with stderr on a pseudo-terminal; (exit code, what it drew there)."""
    from runs import REPO_ROOT, cli_env

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-m", "cli", *argv], cwd=REPO_ROOT, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    return proc.wait(timeout=120), drawn.decode(errors="replace")


def test_long_commands_draw_a_progress_bar_only_on_a_terminal(tmp_path, s3_env):
    from runs import save_checkpoint

    run_dir = tmp_path / "run"
    with Ledger.open(run_dir) as led:
        led.start_run(run_id="r", config={}, blobs=f"{s3_env}/bars")
        attempt = led.begin_attempt(world_size=2, stack="ddp")
        save_checkpoint(led, attempt.epoch, 10)
    code, drawn = _stderr_on_a_terminal(["audit", str(run_dir), "--verify-blobs"])
    assert code == 0 and "verifying shard hashes" in drawn and "B/s" in drawn, drawn
    code, drawn = _stderr_on_a_terminal(["audit", str(run_dir), "--verify-blobs", "--json"])
    assert code == 0 and "verifying" not in drawn
    piped = subprocess.run([sys.executable, "-m", "cli", "audit", str(run_dir), "--verify-blobs"],
                           capture_output=True, text=True, timeout=120, env=__import__("runs").cli_env(),
                           cwd=__import__("runs").REPO_ROOT)
    assert piped.returncode == 0 and piped.stderr == ""


def test_a_postgresql_run_keeps_its_blobs_where_run_started_says(pg_run_url, s3_env):
    url = f"{s3_env}/pg-run"
    with Ledger.open(pg_run_url) as led:
        led.start_run(run_id="pg", config={}, blobs=url)
        led.blobs.write("blobs/c/e1/r0.bin", b"abc")
    with Ledger.open(pg_run_url, read_only=True) as ro:
        assert isinstance(ro.blobs, FsspecBlobStore) and list(ro.blobs.list_files()) == ["blobs/c/e1/r0.bin"]


def test_a_postgresql_run_without_a_blob_store_says_so(pg_run_url):
    with Ledger.open(pg_run_url) as led:
        led.start_run(run_id="pg", config={})
        with pytest.raises(LedgerError, match="--blobs"):
            led.blobs.size("blobs/c/e1/r0.bin")


def test_checkpoint_manager_refuses_credentials_in_blobs_before_anything_happens(tmp_path):
    from trainer.checkpoint_manager import CheckpointManager
    from trainer.errors import BadInputError

    with pytest.raises(BadInputError, match="embeds credentials") as refused:
        CheckpointManager(str(tmp_path / "run"), blobs=f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/p")
    assert SECRET_KEY not in str(refused.value)
    assert not (tmp_path / "run").exists()
