"""Shard codecs: exact round trips for every dtype and length, and loud failure on corrupt data."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from ledger import CorruptBlobError, LocalBlobStore, SchemaTooNewError
from ledger import shard_codecs


def _weights(dtype: torch.dtype, n: int, seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(n, generator=gen) * 0.02).to(dtype)
    return t.view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("codec", shard_codecs.CODECS)
@pytest.mark.parametrize(
    ("dtype", "n"),
    [(torch.float32, 4099), (torch.bfloat16, 10001), (torch.float16, 333), (torch.int8, 777), (torch.float64, 65)],
)
def test_round_trip_is_exact(codec, dtype, n):
    data = _weights(dtype, n)
    encoded = shard_codecs.encode(data, codec)
    assert bytes(shard_codecs.decode(bytes(encoded), codec)) == data


@pytest.mark.parametrize("itemsize", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("length", [0, 1, 2, 3, 5, 17, 4096, 4097])
def test_byte_grouped_any_length_and_itemsize(itemsize, length):
    data = np.random.default_rng(length).integers(0, 8, size=length, dtype=np.uint8).tobytes()
    encoded = shard_codecs.encode(data, "zstd-bg", itemsize=itemsize)
    assert encoded[4 + 1] == itemsize  # recorded in the header
    assert shard_codecs.decode(encoded, "zstd-bg") == data


def test_byte_grouping_shrinks_float_weights_and_uses_the_views_itemsize():
    data = np.frombuffer(_weights(torch.float32, 1 << 16), dtype=np.float32)
    grouped = shard_codecs.encode(memoryview(data), "zstd-bg")
    plain = shard_codecs.encode(data.tobytes(), "zstd")
    assert grouped[5] == 4
    assert len(grouped) < len(plain)


def test_probe_groups_floats_by_their_width():
    assert shard_codecs.choose_itemsize(_weights(torch.float32, 1 << 17)) == 4
    assert shard_codecs.choose_itemsize(_weights(torch.bfloat16, 1 << 17)) == 2


def test_non_float_data_falls_back_to_about_plain_zstd():
    words = np.random.default_rng(0).choice([b"alpha", b"beta", b"gamma", b"delta", b" ", b"\n"], size=200_000)
    text = b"".join(words.tolist())
    encoded = shard_codecs.encode(text, "zstd-bg")
    assert shard_codecs.decode(encoded, "zstd-bg") == text
    assert len(encoded) <= 1.02 * len(shard_codecs.encode(text, "zstd")) + 16


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda b: b[:10], "shorter than the zstd-bg header"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:5] + b"\x00" + b[6:], "element size 0"),
        (lambda b: b[:8] + struct.pack("<Q", 12345) + b[16:], "header says 12345|not a valid"),
        (lambda b: b[:-7], "not a valid zstd-bg stream"),
        (lambda b: b[:16] + bytes(x ^ 0xFF for x in b[16:40]) + b[40:], "not a valid zstd-bg stream"),
    ],
)
def test_corrupt_byte_grouped_data_raises(mangle, match):
    encoded = shard_codecs.encode(_weights(torch.float32, 5000), "zstd-bg")
    with pytest.raises(CorruptBlobError, match=match):
        shard_codecs.decode(mangle(encoded), "zstd-bg", location="blobs/c/e1/rank0.bin")


def test_corrupt_zstd_raises_and_unknown_codecs_are_refused():
    with pytest.raises(CorruptBlobError, match="rank0.bin is not a valid zstd stream"):
        shard_codecs.decode(b"not zstd at all", "zstd", location="rank0.bin")
    with pytest.raises(SchemaTooNewError, match="codec 'lz9'"):
        shard_codecs.decode(b"", "lz9")
    with pytest.raises(ValueError, match="unknown codec"):
        shard_codecs.encode(b"", "lz9")
    with pytest.raises(SchemaTooNewError, match="zstd-bg format 9"):
        shard_codecs.decode(b"CKBG\x09\x04" + bytes(10), "zstd-bg")


@pytest.mark.parametrize("codec", shard_codecs.CODECS)
def test_blob_store_records_and_reads_back_every_codec(tmp_path, codec):
    store = LocalBlobStore(tmp_path)
    data = _weights(torch.bfloat16, 3001)
    info = store.write("blobs/c1/e1/rank0.bin", data, codec=codec)
    assert info.codec == codec
    assert store.read(info.location, expected_hash=info.hash, codec=codec) == data
    store.verify(info.location, info.hash, info.bytes)


def test_blob_store_read_of_undecodable_blob_raises_corrupt(tmp_path):
    store = LocalBlobStore(tmp_path)
    info = store.write("blobs/c1/e1/rank0.bin", b"raw bytes", codec="none")
    with pytest.raises(CorruptBlobError, match="rank0.bin"):
        store.read(info.location, codec="zstd-bg")


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_grouping_piece_by_piece_inverts_piece_by_piece(itemsize):
    """What a streaming encoder relies on: pieces a multiple of ``itemsize`` long group and ungroup alone."""
    data = _weights(torch.float32, 1001)[:-1] + b"\x01\x02\x03"  # a length no itemsize divides
    piece = 64 * itemsize
    grouped = [shard_codecs.group_bytes(data[i : i + piece], itemsize) for i in range(0, len(data), piece)]
    assert b"".join(shard_codecs.ungroup_bytes(g, itemsize) for g in grouped) == data
    assert shard_codecs.group_bytes(data[:piece], itemsize)[: 64] == data[:piece : itemsize]  # byte 0 of each element first
