"""Blob store: atomic durable writes, zstd, hash verification, and refusing paths outside the run dir."""

from __future__ import annotations

import os

import pytest

from ledger import CorruptBlobError, Ledger, LedgerError
import ledger.blobs as blobs_module
from ledger import direct_io
from ledger.blobs import LocalBlobStore, check_component


@pytest.fixture(params=["direct", "buffered"])
def store(request, tmp_path, monkeypatch) -> LocalBlobStore:
    """Both write paths: O_DIRECT through the bounce buffer, and ordinary writes (where O_DIRECT is refused)."""
    if request.param == "buffered":
        monkeypatch.setattr(blobs_module, "open_direct", lambda path: None)
    return LocalBlobStore(tmp_path)


DATA = bytes(range(256)) * 64


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_round_trip_with_hash(store, codec):
    info = store.write("blobs/c1/e1/rank0.bin", DATA, codec=codec)
    assert info.codec == codec and info.hash.startswith("xxh3-128:")
    assert info.bytes == store.size(info.location)
    assert store.read(info.location, expected_hash=info.hash, codec=codec) == DATA
    store.verify(info.location, info.hash, info.bytes)
    if codec == "zstd":
        assert info.bytes < len(DATA)  # the hash and size are of the bytes as stored


def test_write_leaves_no_temp_file_and_replaces_atomically(store, tmp_path):
    store.write("blobs/c/e1/r0", b"old")
    info = store.write("blobs/c/e1/r0", b"new!")
    assert store.read(info.location, expected_hash=info.hash) == b"new!"
    assert sorted(p.name for p in (tmp_path / "blobs/c/e1").iterdir()) == ["r0"]


def test_failed_write_leaves_nothing(store, tmp_path):
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with store.open_atomic("blobs/c/e1/r0") as sink:
            sink.write(b"partial")
            raise Boom
    assert not store.exists("blobs/c/e1/r0")
    assert list((tmp_path / "blobs/c/e1").iterdir()) == []


def _flip_bit(path, offset=10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["bit-flip", "truncate", "missing", "extend"])
def test_damage_is_detected(store, damage):
    info = store.write("blobs/c/e1/r0", DATA)
    path = store.path(info.location)
    if damage == "bit-flip":
        _flip_bit(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-1])
    elif damage == "extend":
        path.write_bytes(path.read_bytes() + b"\0")
    else:
        path.unlink()
    with pytest.raises(CorruptBlobError) as caught:
        store.verify(info.location, info.hash, info.bytes)
    assert caught.value.location == info.location and caught.value.expected_hash == info.hash
    assert (caught.value.found_hash is None) == (damage == "missing")
    with pytest.raises(CorruptBlobError):
        store.read(info.location, expected_hash=info.hash)


def test_bit_flip_with_same_size_is_caught_by_hash_alone(store):
    info = store.write("blobs/c/e1/r0", DATA, codec="zstd")
    _flip_bit(store.path(info.location), offset=info.bytes // 2)
    with pytest.raises(CorruptBlobError, match="does not match"):
        store.verify(info.location, info.hash, info.bytes)
    with pytest.raises(CorruptBlobError):
        store.read(info.location, expected_hash=info.hash, codec="zstd")


@pytest.mark.parametrize("location", ["../outside", "blobs/../../x", "/etc/passwd", "blobs/c/../../../x"])
def test_locations_escaping_the_root_are_refused(store, tmp_path, location):
    for op in (lambda: store.write(location, b"x"), lambda: store.read(location),
               lambda: store.delete(location), lambda: store.exists(location)):
        with pytest.raises(ValueError, match="escapes"):
            op()
    assert not (tmp_path.parent / "outside").exists()


def test_symlink_escaping_the_root_is_refused(store, tmp_path_factory, tmp_path):
    outside = tmp_path_factory.mktemp("outside")
    (tmp_path / "blobs").mkdir()
    os.symlink(outside, tmp_path / "blobs" / "link")
    with pytest.raises(ValueError, match="escapes"):
        store.write("blobs/link/x", b"x")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("bad", ["a/b", "..", ".", "../x", "", "/abs", ".hidden", "-x", "a\\b", "c\n", "c\x00", "é/"])
def test_checkpoint_ids_that_could_escape_or_collide_are_refused(tmp_path, bad):
    with pytest.raises(ValueError):
        check_component(bad, "checkpoint id")
    with Ledger.open(tmp_path) as led:
        attempt = led.begin_attempt()
        with pytest.raises(ValueError):
            led.begin_checkpoint(checkpoint_id=bad, step=1, ranks=[0], world_size=1, stack="ddp", epoch=attempt.epoch)
        assert led.max_seq() == 1  # nothing recorded


@pytest.mark.parametrize("good", ["ckpt-000100", "step_5.final", "A1"])
def test_plain_checkpoint_ids_are_accepted(store, good):
    assert store.checkpoint_dir(good, 3) == f"blobs/{good}/e3"


def test_delete_is_idempotent_and_prunes_empty_dirs(store, tmp_path):
    store.write("blobs/c/e1/r0", b"a")
    store.write("blobs/c/e1/r1", b"b")
    store.delete("blobs/c/e1/r0")
    store.delete("blobs/c/e1/r0")
    assert sorted(store.list_files()) == ["blobs/c/e1/r1"]
    store.delete("blobs/c/e1/r1")
    assert list(store.list_files()) == []
    assert not (tmp_path / "blobs/c").exists() and (tmp_path / "blobs").is_dir()


def test_unknown_codec_is_refused(store):
    with pytest.raises(ValueError, match="codec"):
        store.write("blobs/c/e1/r0", b"x", codec="lz4")
    assert not store.exists("blobs/c/e1/r0")


def test_corrupt_blob_error_is_a_ledger_error_and_an_ioerror():
    assert issubclass(CorruptBlobError, LedgerError) and issubclass(CorruptBlobError, OSError)


def test_hashes_recorded_with_blake2b_by_earlier_versions_still_verify(store):
    import hashlib

    info = store.write("blobs/c1/e1/old.bin", DATA)
    old = "blake2b:" + hashlib.blake2b(DATA, digest_size=32).hexdigest()
    store.verify(info.location, old, len(DATA))
    assert store.read(info.location, expected_hash=old) == DATA
    wrong = "blake2b:" + hashlib.blake2b(DATA + b"x", digest_size=32).hexdigest()
    with pytest.raises(CorruptBlobError, match="does not match"):
        store.verify(info.location, wrong)


def test_a_hash_naming_an_unknown_algorithm_never_vouches_for_a_blob(store):
    info = store.write("blobs/c1/e1/r.bin", DATA)
    for recorded in ("md5:00", "no-algorithm"):
        with pytest.raises(CorruptBlobError, match="names no known algorithm"):
            store.verify(info.location, recorded)
        with pytest.raises(CorruptBlobError, match="names no known algorithm"):
            store.read(info.location, expected_hash=recorded)


def test_streamed_writes_hash_and_store_exactly_the_bytes_in_order(store):
    pieces = [b"head", bytearray(b"-middle-"), memoryview(DATA), b"", b"tail"]
    with store.open_atomic("blobs/c/e1/streamed") as sink:
        sink.write(pieces[0])
        sink.writev(pieces[1:])
    whole = b"".join(bytes(p) for p in pieces)
    assert sink.location == "blobs/c/e1/streamed" and sink.size == len(whole)
    single = store.write("blobs/c/e1/single", whole)
    assert sink.hash == single.hash  # the hash is of the byte stream, however it was cut up
    store.verify(sink.location, sink.hash, sink.size)


def test_writev_with_more_buffers_than_one_system_call_takes(store):
    pieces = [bytes([i % 251]) * (i % 7) for i in range(3000)]
    with store.open_atomic("blobs/c/e1/many") as sink:
        sink.writev(pieces)
    assert store.read("blobs/c/e1/many", expected_hash=sink.hash) == b"".join(pieces)


def test_open_read_is_seekable_and_reads_into_buffers(store):
    info = store.write("blobs/c/e1/r0", DATA)
    with store.open_read(info.location) as fh:
        fh.seek(100)
        buffer = bytearray(50)
        assert fh.readinto(buffer) == 50 and bytes(buffer) == DATA[100:150]
        assert fh.tell() == 150
        fh.seek(-6, os.SEEK_END)
        assert fh.read(100) == DATA[-6:]
    with pytest.raises(CorruptBlobError, match="missing") as caught:
        store.open_read("blobs/c/e1/nothing")
    assert caught.value.found_hash is None


@pytest.mark.parametrize("size", [0, 1, direct_io.ALIGN - 1, direct_io.ALIGN, direct_io.BOUNCE_BYTES + 12345])
def test_direct_writes_keep_the_exact_size_and_bytes_across_block_and_buffer_edges(tmp_path, size):
    store = LocalBlobStore(tmp_path)
    data = os.urandom(size)
    with store.open_atomic("blobs/c/e1/r0") as sink:
        sink.write(data[: size // 3])
        sink.writev([data[size // 3: size // 2], data[size // 2:]])
    assert store.size("blobs/c/e1/r0") == size == sink.size
    assert store.read("blobs/c/e1/r0", expected_hash=sink.hash) == data
