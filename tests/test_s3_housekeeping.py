"""Store housekeeping against a real S3 server (SeaweedFS) that stops answering: every call has a deadline.

A listing (page by page), a delete or an abort of unfinished uploads ends within
``FsspecBlobStore.housekeeping_deadline_s`` — set to a few seconds here to keep the tests
short — with ``BlobStoreTimeoutError`` when the server is frozen (SIGSTOP: the kernel
still accepts connections, nothing answers) or gone (SIGKILL). Rank 0's recorder turns
that into a warning: the commit stands, no blob is lost, and the next pass (or ``gc``)
finishes the work. No mocks: every call goes to ``weed server -s3`` on loopback.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import pytest

from ledger import Ledger, RetentionPolicy
from ledger.audit import audit
from ledger.blobs import blob_store_for
from ledger.blobs_remote import FsspecBlobStore
from ledger.errors import BlobStoreError, BlobStoreTimeoutError
from ledger.garbage import execute_gc, plan_gc
from ledger.store_deadline import HOUSEKEEPING_DEADLINE_S
from s3_server import SeaweedS3
from trainer.checkpoint_commit import checkpoint_id_for
from trainer.run_recorder import RunRecorder, ShardFact
from trainer.store_housekeeping import OlderEpochSweep

DEADLINE_S = 2.0
#: What a call past its deadline may take beyond it: cancelling the request on the client's loop.
SLACK_S = 3.0
TOPOLOGY = {"tp": 1, "pp": 1, "dp": 1}


@pytest.fixture
def store(s3_env) -> FsspecBlobStore:
    found = blob_store_for(f"{s3_env}/hk", "/nonexistent-run-dir")
    assert isinstance(found, FsspecBlobStore)
    found.housekeeping_deadline_s = DEADLINE_S
    return found


@contextmanager
def frozen(server: SeaweedS3):
    """The server stops answering for the block (SIGSTOP), then carries on (SIGCONT)."""
    server.freeze()
    try:
        yield
    finally:
        server.thaw()


def seconds_to_fail(call: Callable[[], object], error: type[BaseException], match: str) -> float:
    started = time.monotonic()
    with pytest.raises(error, match=match):
        call()
    return time.monotonic() - started


def test_the_default_deadline_is_20_seconds():
    assert HOUSEKEEPING_DEADLINE_S == 20.0 and FsspecBlobStore.housekeeping_deadline_s == 20.0


def test_a_listing_goes_page_by_page_and_its_deadline_is_checked_between_pages(store, s3_server):
    names = sorted(f"blobs/c{i}/e1/r0.bin" for i in range(5))
    for name in names:
        store.write(name, name.encode())
    store.list_page_keys = 2
    assert list(store.list_files()) == names  # three pages, in order

    pages = store.list_files()
    first_page = [next(pages), next(pages)]
    with frozen(s3_server):  # the second page never comes
        took = seconds_to_fail(lambda: list(pages), BlobStoreTimeoutError,
                               r"listing s3://.*\(1 page\(s\) of 2 keys listed\)")
    assert first_page == names[:2]
    assert took < DEADLINE_S + SLACK_S
    assert list(store.list_files()) == names  # answering again: every object still there


def test_deletes_and_upload_listings_on_a_frozen_store_end_within_the_deadline(store, s3_server, s3_env):
    kept = store.write("blobs/c/e1/keep.bin", b"k" * 1000)
    doomed = store.write("blobs/c/e1/doomed.bin", b"d" * 1000)
    bucket, key = f"{s3_env[len('s3://'):]}/hk/blobs/c/e1/orphan.bin".split("/", 1)
    s3_server.client().call_s3("create_multipart_upload", Bucket=bucket, Key=key)  # a dead writer's upload
    with frozen(s3_server):
        for call, what in ((lambda: store.delete(doomed.location), "deleting s3://"),
                           (store.unfinished_uploads, "listing unfinished uploads under s3://"),
                           (lambda: store.abort_uploads("blobs/c/e1/orphan.bin"), "aborting the unfinished uploads")):
            took = seconds_to_fail(call, BlobStoreTimeoutError, f"{what}.*within {DEADLINE_S:g} s")
            assert took < DEADLINE_S + SLACK_S, what
    # Nothing else was touched, and the work is done once the store answers. (The frozen server may
    # still carry out the DELETE it had received: a request past its deadline is given up, not undone.)
    store.verify(kept.location, kept.hash, kept.bytes)
    assert store.unfinished_uploads() == ["blobs/c/e1/orphan.bin"]
    store.abort_uploads("blobs/c/e1/orphan.bin")
    store.delete(doomed.location)
    assert store.unfinished_uploads() == [] and list(store.list_files()) == [kept.location]


def _recorder(run_dir, url: str, *, deadline_s: float = DEADLINE_S) -> RunRecorder:
    recorder = RunRecorder(str(run_dir))
    recorder.start_run({}, "cafe", None, blobs=url)
    recorder.blobs.housekeeping_deadline_s = deadline_s
    return recorder


def _begin(recorder: RunRecorder) -> int:
    return recorder.begin_attempt(world_size=1, stack="ddp", topology=TOPOLOGY, resumed_from=None, slurm=None,
                                  previous_topology=None)


def _save(recorder: RunRecorder, step: int) -> ShardFact:
    """One committed checkpoint of one rank's file, through the recorder as the trainer commits."""
    cid = checkpoint_id_for(step, recorder.epoch)
    assert recorder.begin_checkpoint(cid, step, 1, "ddp", TOPOLOGY)
    info = recorder.blobs.write(f"{recorder.checkpoint_dir(cid)}/__0_0.distcp", f"state at {step}".encode() * 100)
    shard = ShardFact(rank=0, location=info.location, bytes=info.bytes, hash=info.hash)
    assert recorder.commit_checkpoint(cid, [shard])
    return shard


def _retention_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "retention after a commit" in line]


def test_retention_on_a_frozen_store_is_a_warning_the_commit_stands_and_the_next_pass_finishes(
        tmp_path, s3_server, s3_env, capfd):
    recorder = _recorder(tmp_path / "run", f"{s3_env}/ret")
    _begin(recorder)
    policy = RetentionPolicy(keep_last=1)
    first = _save(recorder, 10)
    assert recorder.apply_retention(policy) == []
    second = _save(recorder, 20)
    with frozen(s3_server):
        started = time.monotonic()
        deleted = recorder.apply_retention(policy)
        took = time.monotonic() - started
    assert deleted == [] and took < DEADLINE_S + SLACK_S
    [warning] = _retention_warnings(capfd.readouterr().err)
    assert "warning" in warning and "within 2 s" in warning and "the commit stands" in warning

    view = recorder.projection()
    assert view.latest.checkpoint_id == checkpoint_id_for(20, recorder.epoch)
    assert view.checkpoints[checkpoint_id_for(10, recorder.epoch)].status == "deleted"  # requested, never loaded
    # The committed checkpoint's blob is intact. (Step 10's may be gone: its deletion was requested, and the
    # frozen server may still carry out the DELETE it had received when it answers again.)
    recorder.blobs.verify(second.location, second.hash, second.bytes)

    _save(recorder, 30)  # the next pass finishes the interrupted deletion and applies the policy
    assert sorted(recorder.apply_retention(policy)) == [checkpoint_id_for(10, recorder.epoch),
                                                        checkpoint_id_for(20, recorder.epoch)]
    assert _retention_warnings(capfd.readouterr().err) == []
    assert recorder.blobs.size(first.location) is None and recorder.blobs.size(second.location) is None
    recorder.end_attempt("completed", 30)
    recorder.close()


def _older_attempt_with_a_stray(run_dir, url: str) -> tuple[str, ShardFact]:
    """Attempt 1 commits step 10, then leaves a file no event records (a fenced writer's)."""
    recorder = _recorder(run_dir, url)
    _begin(recorder)
    kept = _save(recorder, 10)
    stray = f"{recorder.checkpoint_dir(checkpoint_id_for(20, recorder.epoch))}/__0_0.distcp"
    recorder.blobs.write(stray, b"written, never recorded")
    recorder.close()  # no attempt.ended: it crashed
    return stray, kept


def test_the_older_epoch_sweep_on_a_frozen_store_warns_and_the_next_attempt_sweeps(
        tmp_path, s3_server, s3_env, capfd):
    run_dir = tmp_path / "run"
    stray, kept = _older_attempt_with_a_stray(run_dir, f"{s3_env}/sweep")
    recorder = RunRecorder(str(run_dir))
    recorder.blobs.housekeeping_deadline_s = DEADLINE_S
    with frozen(s3_server):
        started = time.monotonic()
        _begin(recorder)  # the sweep starts on its own thread: beginning the attempt does not wait for it
        began = time.monotonic() - started
        recorder.close()  # waits for the sweep, which fails at its deadline
        closed = time.monotonic() - started
    assert began < DEADLINE_S - 0.5 and closed < DEADLINE_S + SLACK_S
    warning = [line for line in capfd.readouterr().err.splitlines() if "sweeping older attempts" in line]
    assert len(warning) == 1 and "within 2 s" in warning[0] and "`ckpt-ledger gc` removes" in warning[0]
    store = blob_store_for(f"{s3_env}/sweep", run_dir)
    assert store.size(stray) is not None
    store.verify(kept.location, kept.hash, kept.bytes)

    # The next attempt, with the store answering, removes the stray and nothing else.
    recorder = RunRecorder(str(run_dir))
    epoch = _begin(recorder)
    own = f"{recorder.checkpoint_dir(checkpoint_id_for(30, epoch))}/.tmp-of-this-attempt"
    recorder.blobs.write(own, b"this attempt's own file")
    recorder.close()
    assert store.size(stray) is None and store.size(own) is not None
    store.verify(kept.location, kept.hash, kept.bytes)
    assert "sweeping" not in capfd.readouterr().err


def test_a_recorder_closing_stops_waiting_for_a_slow_sweep_and_it_deletes_nothing(tmp_path, s3_server, s3_env,
                                                                                   capfd):
    run_dir = tmp_path / "run"
    stray, _ = _older_attempt_with_a_stray(run_dir, f"{s3_env}/slow")
    with Ledger.open(run_dir) as led:
        led.blobs.housekeeping_deadline_s = 4 * DEADLINE_S
        epoch = led.begin_attempt(world_size=1, stack="ddp").epoch
        with frozen(s3_server):
            sweep = OlderEpochSweep.start(led, led.projection, epoch)
            started = time.monotonic()
            sweep.finish(timeout_s=0.5)
            assert time.monotonic() - started < 0.5 + SLACK_S
        assert "was still running after 0.5 s and was stopped" in capfd.readouterr().err
        sweep._thread.join(4 * DEADLINE_S + SLACK_S)  # it ends by itself: listed or not, it deletes nothing now
        assert sweep.done and sweep.removed == []
        assert led.blobs.size(stray) is not None


def test_a_stopped_server_fails_housekeeping_within_the_deadline_and_loses_nothing(tmp_path, capfd, monkeypatch):
    server = SeaweedS3(tmp_path / "weed").start()
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        url = f"s3://{server.new_bucket()}/stopped"
        recorder = _recorder(tmp_path / "run", url)
        _begin(recorder)
        policy = RetentionPolicy(keep_last=1)
        first = _save(recorder, 10)
        second = _save(recorder, 20)
        server.kill()
        started = time.monotonic()
        assert recorder.apply_retention(policy) == []
        took = time.monotonic() - started
        [warning] = _retention_warnings(capfd.readouterr().err)
        assert took < DEADLINE_S + SLACK_S and "the commit stands" in warning
        recorder.end_attempt("completed", 20)
        recorder.close()
        with pytest.raises(BlobStoreError):  # any call ends; a listing too
            list(recorder.blobs.list_files())

        server.start(same_ports=True)
        with Ledger.open(tmp_path / "run") as led:
            view = led.projection()
            assert view.latest.checkpoint_id == checkpoint_id_for(20, 1)
            for shard in (first, second):
                led.blobs.verify(shard.location, shard.hash, shard.bytes)
            done = execute_gc(led, plan_gc(led, policy))  # gc finishes the requested deletion
            assert [d.checkpoint_id for d in done.deletions] == [checkpoint_id_for(10, 1)]
            assert led.blobs.size(first.location) is None
            led.blobs.verify(second.location, second.hash, second.bytes)
            report = audit(led)
            assert report.healthy, [f.message for f in report.problems]
    finally:
        server.kill()  # SIGKILL: a graceful stop takes SeaweedFS ~15 s, and the data is thrown away
