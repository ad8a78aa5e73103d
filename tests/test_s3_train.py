"""``ckpt-ledger train --blobs s3://...`` against a real S3 server (SeaweedFS), end to end.

Every rank uploads its own shards; the run directory keeps only the ledger; every read
command finds the objects from ``run.started`` with no flag; nothing secret is recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ledger import Ledger
from s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3
from trainer_support import (
    QUICK,
    REPO,
    assert_bitwise_equal,
    cli_env,
    committed_steps,
    export_state,
    kill_group,
    reference_run,
    run_cli,
    start_cli,
    view_of,
    wait_for,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(900)]


def local_files(run_dir: Path) -> list[str]:
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())


def objects(server: SeaweedS3, url: str) -> list[str]:
    """Every object under ``url`` as the server lists it (the test's own client)."""
    fs = server.client()
    root = url[len("s3://"):]
    try:
        return sorted(p[len(root) + 1:] for p in fs.find(root))
    except FileNotFoundError:
        return []


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(*map(str, args), timeout=timeout)


def no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET_KEY not in text and ACCESS_KEY not in text


def test_killed_run_on_s3_resumes_bitwise_with_nothing_local(tmp_path, tmp_path_factory, s3_server, s3_env):
    _, reference = reference_run(tmp_path_factory, "fsdp")
    run_dir, url = tmp_path / "run", f"{s3_env}/team/exp1"
    args = ("train", "--run-dir", str(run_dir), "--stack", "fsdp", "--nproc", "2", *QUICK)

    # SIGKILL the whole process group once a first checkpoint is committed (uploads may be mid-way).
    proc = start_cli(*args, "--blobs", url)
    wait_for(lambda: bool(committed_steps(run_dir)), timeout=300, proc=proc, what="the first commit")
    kill_group(proc, signal.SIGKILL)
    killed_out, killed_err = proc.communicate(timeout=60)
    assert 30 not in committed_steps(run_dir), "the run finished before it could be killed"

    # Resume with no --blobs: the run's recorded store is used.
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    view = view_of(run_dir)
    assert view.attempts[-1].status == "completed" and view.attempts[-1].resumed_from is not None
    assert_bitwise_equal(reference, export_state(run_dir, tmp_path / "final.pt"))

    # Shards live only in the bucket; the run directory holds the ledger and nothing else.
    assert all(name.startswith("ledger.db") for name in local_files(run_dir)), local_files(run_dir)
    with Ledger.open(run_dir, read_only=True) as led:
        assert led.events(tags=["run.started"])[0].event.blobs == url
        recorded = {s.location for c in led.projection().checkpoints.values() if c.status == "committed"
                    for s in c.shards}
    assert recorded and recorded <= set(objects(s3_server, url))
    assert {loc.split("/")[1] for loc in recorded} >= {"step000030-e2"}
    for rank in (0, 1):  # every rank uploaded a shard of its own
        assert any(loc.endswith(f"__{rank}_0.distcp") for loc in recorded)

    # gc removes (and aborts) what the killed attempt left; the audit then re-hashes every object.
    assert cli("gc", run_dir).returncode == 0
    audit = cli("audit", run_dir, "--verify-blobs", "--json")
    assert audit.returncode == 0, audit.stdout
    assert json.loads(audit.stdout)["checked"]["bytes_hashed"] > 0
    assert set(objects(s3_server, url)) == recorded

    # No credential anywhere: not in any event, not in any output.
    replay = cli("replay", run_dir, "--json")
    assert replay.returncode == 0
    no_secret(replay.stdout, done.stdout, done.stderr, killed_out, killed_err, audit.stdout)
    assert url in replay.stdout


def test_corrupt_and_missing_objects_and_retention_on_s3(tmp_path, s3_server, s3_env):
    run_dir, url = tmp_path / "run", f"{s3_env}/exp2"
    first = cli("train", "--run-dir", run_dir, "--blobs", url, "--nproc", "2", *QUICK, "--keep-last", "2", timeout=300)
    assert first.returncode == 0, first.stderr
    view = view_of(run_dir)
    deleted = [c for c in view.checkpoints.values() if c.status == "deleted"]
    kept = {c.step: c for c in view.checkpoints.values() if c.status == "committed"}
    assert [c.step for c in deleted] == [10] and sorted(kept) == [20, 30]
    # Retention deleted the objects of the checkpoint it dropped, and only those.
    stored = objects(s3_server, url)
    assert not any(d.checkpoint_id in name for d in deleted for name in stored)
    assert {s.location for c in kept.values() for s in c.shards} == set(stored)

    # Flip one byte of an object of the resume target, in the bucket.
    victim = max(kept[30].shards, key=lambda s: s.bytes)
    fs, key = s3_server.client(), f"{url[5:]}/{victim.location}"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0x40
    fs.pipe_file(key, bytes(data))
    audit = cli("audit", run_dir, "--verify-blobs", "--json")
    assert audit.returncode == 1
    kinds = {(f["kind"], f["subject"]) for f in json.loads(audit.stdout)["findings"] if f["severity"] == "problem"}
    assert kinds == {("hash_mismatch", victim.location)}

    # The next attempt records the corruption and falls back to the previous checkpoint.
    resumed = cli("train", "--run-dir", run_dir, "--nproc", "2", *QUICK[2:], "--steps", "40", "--keep-last", "2",
                  timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    view = view_of(run_dir)
    with Ledger.open(run_dir, read_only=True) as led:
        found = [e.event for e in led.events(tags=["corruption.detected"])]
    assert [(c.checkpoint_id, c.location) for c in found] == [(kept[30].checkpoint_id, victim.location)]
    assert view.attempts[-1].resumed_from == kept[20].checkpoint_id

    # An object gone from the bucket is a PROBLEM for audit, which says what to do.
    latest = view.latest
    gone = view.checkpoints[latest.checkpoint_id].shards[0]
    fs.rm_file(f"{url[5:]}/{gone.location}")
    audit = cli("audit", run_dir, "--json")
    assert audit.returncode == 1
    problems = [f for f in json.loads(audit.stdout)["findings"] if f["severity"] == "problem"]
    assert [(f["kind"], f["subject"]) for f in problems] == [("missing_shard", gone.location)]
    assert problems[0]["fix"]

    # The run's store is the recorded one: asking for another is refused before anything is written.
    other = cli("train", "--run-dir", run_dir, "--blobs", f"{s3_env}/elsewhere", "--nproc", "2", "--steps", "50",
                timeout=300)
    assert other.returncode == 2, other.stderr
    assert url in other.stderr and "recorded in run.started" in other.stderr
    assert objects(s3_server, f"{s3_env}/elsewhere") == []


# In `make test`: nothing after a commit lists the store any more (older epochs' strays are swept once, at
# the attempt's start, on a thread of its own), and every housekeeping call has a deadline
# (FsspecBlobStore.housekeeping_deadline_s), so a store frozen right after the first commit cannot hold the
# writer through s3fs's retries for minutes (it did, before: dc5e276).
def test_store_stopped_mid_run_aborts_the_checkpoint_and_commits_nothing_incomplete(tmp_path, monkeypatch):
    server = SeaweedS3(tmp_path / "weed").start()
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        bucket = server.new_bucket()
        run_dir, url = tmp_path / "run", f"s3://{bucket}/exp3"
        proc = start_cli("train", "--run-dir", str(run_dir), "--blobs", url, "--nproc", "2", *QUICK)
        wait_for(lambda: bool(committed_steps(run_dir)), timeout=300, proc=proc, what="the first commit")
        # Freeze the store, so the next checkpoint is certainly mid-upload when it dies, then kill it.
        server.freeze()
        wait_for(lambda: any(c.step == 20 for c in view_of(run_dir).checkpoints.values()), timeout=300, proc=proc,
                 what="the next checkpoint to begin")
        server.kill()
        out, err = proc.communicate(timeout=600)
        view = view_of(run_dir)
        aborted = [c for c in view.checkpoints.values() if c.status == "aborted"]
        assert aborted, (out, err)
        for ckpt in aborted:  # each says why, on one line, without a credential
            assert ckpt.abort_reason and "\n" not in ckpt.abort_reason
            no_secret(ckpt.abort_reason)
        assert all(url in c.abort_reason for c in aborted), [c.abort_reason for c in aborted]  # names the store
        # It ended cleanly: a recorded end, a one-line error, no traceback.
        assert proc.returncode == 1, err
        assert view.attempts[-1].status == "failed"
        assert "Traceback" not in err
        no_secret(out, err)

        # Back up: every committed checkpoint is complete and verifies; gc clears the rest.
        server.start(same_ports=True)
        committed = [c for c in view.checkpoints.values() if c.status == "committed"]
        assert committed
        with Ledger.open(run_dir, read_only=True) as led:
            for ckpt in committed:
                for shard in ckpt.shards:
                    led.blobs.verify(shard.location, shard.hash, shard.bytes)
        assert cli("gc", run_dir).returncode == 0
        audit = cli("audit", run_dir, "--verify-blobs", "--json")
        problems = [f for f in json.loads(audit.stdout)["findings"] if f["severity"] == "problem"]
        assert problems == []
    finally:
        server.kill()  # its data is thrown away: SIGKILL, not a graceful stop that takes SeaweedFS ~15 s


def test_bad_blob_urls_are_one_line_usage_errors(tmp_path):
    for url, words in ((f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/p", "embeds credentials"),
                       ("s3:///nobucket", "names no bucket")):
        done = subprocess.run([sys.executable, "-m", "cli", "train", "--run-dir", str(tmp_path / "run"),
                               "--blobs", url, "--steps", "1"], cwd=REPO, env=cli_env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1
        no_secret(done.stderr, done.stdout)
        assert not (tmp_path / "run").exists()


def test_blobs_in_another_local_directory(tmp_path):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "shards"
    relative = os.path.relpath(elsewhere, REPO)  # the CLI runs in REPO: a relative --blobs is taken from there
    done = cli("train", "--run-dir", run_dir, "--blobs", relative, "--steps", "20", "--ckpt-every", "10",
               "--eval-every", "10", timeout=300)
    assert done.returncode == 0, done.stderr
    with Ledger.open(run_dir, read_only=True) as led:
        assert led.events(tags=["run.started"])[0].event.blobs == str(elsewhere)  # recorded absolute
        shards = [s.location for c in led.projection().checkpoints.values() for s in c.shards]
    assert all(name.startswith("ledger.db") for name in local_files(run_dir))
    assert shards and all((elsewhere / loc).is_file() for loc in shards)
    assert cli("audit", run_dir, "--verify-blobs").returncode == 0
    assert export_state(run_dir, tmp_path / "model.pt")


def test_a_run_with_no_shared_file_system_at_all(pg_run_url, s3_server, s3_env):
    """Ledger in PostgreSQL, shards in S3: nothing of the run on the local disk."""
    url = f"{s3_env}/pg"
    done = cli("train", "--run-dir", pg_run_url, "--blobs", url, "--nproc", "2", "--steps", "20",
               "--ckpt-every", "10", "--eval-every", "10", timeout=300)
    assert done.returncode == 0, done.stderr
    view = view_of(pg_run_url)
    assert [c.step for c in view.checkpoints.values() if c.status == "committed"] == [10, 20]
    recorded = {s.location for c in view.checkpoints.values() for s in c.shards}
    assert recorded == set(objects(s3_server, url))
    # Resharded on load, from the store: ddp on 2 ranks -> fsdp on 1.
    resumed = cli("train", "--run-dir", pg_run_url, "--stack", "fsdp", "--nproc", "1", "--steps", "30",
                  "--ckpt-every", "10", "--eval-every", "10", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    view = view_of(pg_run_url)
    assert view.checkpoints[view.attempts[-1].resumed_from].step == 20
    assert view.attempts[-1].status == "completed" and view.latest.step == 30
    audit = cli("audit", pg_run_url, "--verify-blobs")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    no_secret(done.stdout, done.stderr, resumed.stdout, resumed.stderr, cli("replay", pg_run_url, "--json").stdout)
