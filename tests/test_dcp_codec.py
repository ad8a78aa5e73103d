"""DCP checkpoint codecs: exact round trips through dcp.save/dcp.load, one reader for all, loud corruption."""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import zstandard
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension, ZStandard
from torch.distributed.checkpoint.api import CheckpointException

from ledger import CorruptBlobError, SchemaTooNewError
from ledger.shard_codecs import group_bytes
from trainer import dcp_codec
from trainer.dcp_codec import CHECKPOINT_CODECS, ByteGroupedZstd, reader_registry, writer_extensions

pytestmark = [
    pytest.mark.timeout(120),
    # Single-process DCP (no process group) warns that it assumes one process: that is the intent here.
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

SHARD = "__0_0.distcp"  # the one data file a single-process save writes


def _weights(dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen) * 0.02).to(dtype)


def _state() -> dict[str, object]:
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.0])
    return {
        "fp32": torch.cat([specials, _weights(torch.float32, 5000)]).reshape(-1, 2),
        "bf16": _weights(torch.bfloat16, 3001, seed=1),
        "fp16": _weights(torch.float16, 777, seed=2),
        "int64": torch.randint(-(2**62), 2**62, (129,), generator=torch.Generator().manual_seed(3)),
        "step": torch.tensor(12345, dtype=torch.int64),
        "scalar_fp32": torch.tensor(0.125),
        "empty": torch.empty(0, 7),
        "blob": bytes(range(256)) * 5 + b"\x00tail",
    }


def _template(state: dict[str, object]) -> dict[str, object]:
    return {k: torch.full_like(v, 7) if isinstance(v, torch.Tensor) else b"" for k, v in state.items()}


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _save(state: dict[str, object], path: Path, extensions: list[StreamTransformExtension] | None) -> Path:
    dcp.save(state, storage_writer=FileSystemWriter(path, _extensions=extensions), no_dist=True)
    return path


def _load(path: Path, template: dict[str, object], registry: ExtensionRegistry | None = None) -> dict[str, object]:
    dcp.load(template, storage_reader=FileSystemReader(path, _extension_registry=registry), no_dist=True)
    return template


def _assert_bitwise_equal(loaded: dict[str, object], state: dict[str, object]) -> None:
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
            assert _bits(loaded[key]) == _bits(value), key
        else:
            assert loaded[key] == value, key


@pytest.mark.parametrize("codec", CHECKPOINT_CODECS)
def test_round_trip_is_bitwise_exact_for_every_kind_of_item(tmp_path, codec):
    state = _state()
    _save(state, tmp_path, writer_extensions(codec))
    _assert_bitwise_equal(_load(tmp_path, _template(state), reader_registry()), state)


def test_a_tensor_spanning_several_chunks_round_trips(tmp_path):
    state = {"big": _weights(torch.float32, 3 * dcp_codec.GROUP_CHUNK_BYTES // 4 + 123)}
    _save(state, tmp_path, writer_extensions("zstd-bg"))
    _assert_bitwise_equal(_load(tmp_path, _template(state), reader_registry()), state)


def test_one_registry_reads_checkpoints_of_every_codec_and_of_plain_dcp(tmp_path):
    state = _state()
    written = {codec: _save(state, tmp_path / codec, writer_extensions(codec)) for codec in CHECKPOINT_CODECS}
    written["dcp-default"] = _save(state, tmp_path / "dcp-default", None)  # a checkpoint from before codecs
    written["dcp-zstd"] = _save(state, tmp_path / "dcp-zstd", [ZStandard()])  # DCP's own zstd extension
    registry = reader_registry()
    for path in written.values():
        _assert_bitwise_equal(_load(path, _template(state), registry), state)


def test_dcps_own_reader_reads_our_zstd_checkpoints(tmp_path):
    state = _state()
    _save(state, tmp_path, writer_extensions("zstd"))
    _assert_bitwise_equal(_load(tmp_path, _template(state)), state)


def test_descriptors_in_metadata_name_the_codec(tmp_path):
    descriptors = {}
    for codec in CHECKPOINT_CODECS:
        _save({"w": _weights(torch.float32, 100)}, tmp_path / codec, writer_extensions(codec))
        storage = FileSystemReader(tmp_path / codec).read_metadata().storage_data
        descriptors[codec] = {tuple(info.transform_descriptors or ()) for info in storage.values()}
    assert descriptors == {
        "none": {()},
        "zstd": {("stream.zstd/1",)},
        "zstd-bg": {(f"stream.zstd-bg@ckpt-ledger/1;width=4;chunk={dcp_codec.GROUP_CHUNK_BYTES}",)},
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_byte_grouping_beats_plain_zstd_on_weights(tmp_path, dtype):
    state = {f"layer{i}.weight": _weights(dtype, 256 * 1024, seed=i) for i in range(4)}
    sizes = {codec: (_save(state, tmp_path / codec, writer_extensions(codec)) / SHARD).stat().st_size
             for codec in CHECKPOINT_CODECS}
    assert sizes["zstd-bg"] < 0.97 * sizes["zstd"] < sizes["none"]


def test_storage_records_start_element_aligned_in_the_stream_a_transform_sees(tmp_path):
    """What byte grouping relies on: tensor bytes start at a multiple of the group width."""
    seen: list[bytes] = []

    class Recording(StreamTransformExtension):
        registry_name = staticmethod(lambda: "test.recording")
        from_descriptor = staticmethod(lambda version: Recording())
        get_descriptor = lambda self: "test.recording/1"  # noqa: E731
        transform_from = lambda self, input: input  # noqa: E731, A002

        def transform_to(self, output):  # noqa: ANN001, ANN201
            class Tee(io.RawIOBase):
                def __init__(self) -> None:
                    super().__init__()
                    self.data = bytearray()

                def writable(self) -> bool:
                    return True

                def write(self, b) -> int:  # noqa: ANN001
                    self.data += b
                    return output.write(b)

                def close(self) -> None:
                    seen.append(bytes(self.data))
                    output.close()
                    super().close()

            return Tee()

    state = {k: v for k, v in _state().items() if isinstance(v, torch.Tensor) and v.numel()}
    _save(state, tmp_path, [Recording()])
    assert len(seen) == len(state)
    for stream in seen:
        archive = zipfile.ZipFile(io.BytesIO(stream))
        (record,) = [info for info in archive.infolist() if "/data/" in info.filename]
        header = stream[record.header_offset : record.header_offset + 30]
        name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
        start = record.header_offset + 30 + name_len + extra_len  # the local file header, then the data
        assert start % 64 == 0 and start % dcp_codec.GROUP_WIDTH == 0


def _encode(ext: StreamTransformExtension, data: bytes, splits: list[int]) -> bytes:
    class Sink(io.BytesIO):
        def close(self) -> None:  # DCP's output stream ignores close too; keep the bytes readable
            pass

    sink = Sink()
    writer = ext.transform_to(sink)
    start = 0
    for end in [*splits, len(data)]:
        writer.write(memoryview(data)[start:end])
        start = end
    writer.close()
    return sink.getvalue()


@pytest.mark.parametrize("length", [0, 1, 3, 63, 64, 65, 200, 1000])
def test_stream_format_is_grouped_chunks_in_one_frame_whatever_the_write_sizes(length):
    ext = ByteGroupedZstd(width=4, chunk_bytes=64)
    rng = random.Random(length)
    data = bytes(rng.randrange(4) for _ in range(length))
    splits = sorted(rng.sample(range(length + 1), min(length, 5)))
    encoded = _encode(ext, data, splits)
    # The format: one zstd frame holding group_bytes of each 64-byte piece of the stream.
    grouped = b"".join(group_bytes(data[i : i + 64], 4) for i in range(0, length, 64))
    assert zstandard.ZstdDecompressor().decompressobj().decompress(encoded) == grouped
    decoder = ByteGroupedZstd.from_descriptor(ext.get_descriptor().partition("/")[2])
    assert decoder.transform_from(io.BytesIO(encoded)).read() == data
    small_reads = decoder.transform_from(io.BytesIO(encoded))
    assert b"".join(iter(lambda: small_reads.read(7), b"")) == data


def _flip_byte_inside_item(path: Path, fqn: str) -> None:
    (info,) = [v for k, v in FileSystemReader(path).read_metadata().storage_data.items() if k.fqn == fqn]
    shard = path / info.relative_path
    raw = bytearray(shard.read_bytes())
    raw[info.offset + info.length // 2] ^= 0x10
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("codec", ["zstd", "zstd-bg"])
def test_a_corrupted_item_fails_the_load_instead_of_returning_wrong_tensors(tmp_path, codec):
    state = {"w": _weights(torch.float32, 20000)}
    _save(state, tmp_path, writer_extensions(codec))
    _flip_byte_inside_item(tmp_path, "w")
    with pytest.raises(CheckpointException) as caught:
        _load(tmp_path, _template(state), reader_registry())
    (error, _trace), = caught.value.failures.values()
    assert isinstance(error, CorruptBlobError)
    assert SHARD in str(error) and f"not a valid {codec} stream" in str(error)


@pytest.mark.parametrize("ext", [dcp_codec.ChecksummedZstd(), ByteGroupedZstd()], ids=["zstd", "zstd-bg"])
@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda b: b[:-9], "ends inside its zstd frame"),
        (lambda b: b[:-1], "ends inside its zstd frame"),
        (lambda b: b + b"\x00junk", "after the end of its zstd frame"),
        (lambda b: b"", "ends inside its zstd frame"),
    ],
    ids=["truncated", "last-byte-missing", "trailing-junk", "empty"],
)
def test_truncated_or_padded_streams_are_errors(ext, mangle, match):
    encoded = _encode(ext, _bits(_weights(torch.float32, 3000)), [])
    with pytest.raises(CorruptBlobError, match=match):
        ext.transform_from(io.BytesIO(mangle(encoded))).read()


def test_unknown_codec_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown checkpoint codec 'lz4'; use one of none, zstd, zstd-bg"):
        writer_extensions("lz4")


def test_descriptors_from_newer_or_broken_writers_are_refused():
    registry = reader_registry()
    with pytest.raises(SchemaTooNewError, match="upgrade ckpt-ledger"):
        registry.from_descriptor_list(["stream.zstd-bg@ckpt-ledger/2;width=4;chunk=64"])
    with pytest.raises(SchemaTooNewError, match="stream.zstd/2"):
        registry.from_descriptor_list(["stream.zstd/2"])
    for broken in ["1", "1;width=3;chunk=64", "1;width=0;chunk=64", "1;width=4;chunk=x", "1;width4", "one"]:
        with pytest.raises(CorruptBlobError, match=r"\.metadata names the codec"):
            registry.from_descriptor_list([f"stream.zstd-bg@ckpt-ledger/{broken}"])
    (ext,) = registry.from_descriptor_list(["stream.zstd-bg@ckpt-ledger/1;width=2;chunk=64;level=19"])
    assert (ext.width, ext.chunk_bytes) == (2, 64)  # keys a version-1 reader does not know are ignored


def test_group_layout_is_validated():
    with pytest.raises(ValueError, match="width must be 1..16"):
        ByteGroupedZstd(width=17)
    with pytest.raises(ValueError, match="multiple of the width 4"):
        ByteGroupedZstd(width=4, chunk_bytes=1022)
