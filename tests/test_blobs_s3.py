"""The object-storage blob store against a real S3 server (SeaweedFS): atomic uploads, hashes, listings.

No mocks: every test talks to ``weed server -s3`` on loopback through s3fs, with the
credentials in the standard environment variables only.
"""

from __future__ import annotations

import os

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
