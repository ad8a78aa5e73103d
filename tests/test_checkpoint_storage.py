"""Checkpoint files as raw bytes at recorded offsets, and the Checkpointer's background save around them.

The storage tests drive DCP with ``no_dist=True``; the Checkpointer tests run one gloo
rank in this process (a real process group, a real ledger, a real local blob store —
gated where a test needs to act while the writer is mid-checkpoint).
"""

from __future__ import annotations

import gc
import io
import pickle
import sys
import threading
import warnings
import zipfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from ledger import Ledger, LocalBlobStore, RetentionPolicy
from trainer.checkpoint_storage import ITEM_ALIGNMENT, LedgerStorageReader, LedgerStorageWriter
from trainer.checkpointing import Candidate, Checkpointer
from trainer.dcp_codec import CHECKPOINT_CODECS, reader_registry
from trainer.run_recorder import RunRecorder
from trainer.process_group import free_port, init_distributed

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def sample_state() -> dict:
    torch.manual_seed(0)
    return {
        "model": {"w": torch.randn(33, 17), "half": torch.randn(9).to(torch.bfloat16), "scalar": torch.tensor(2.5),
                  "empty": torch.empty(0, 4), "ids": torch.arange(7, dtype=torch.int64)},
        "transposed": torch.randn(6, 5).t(),  # not contiguous
        "extra": {"note": ["a", 1]},
    }


def empty_like(state: dict) -> dict:
    return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
            "transposed": torch.zeros(5, 6), "extra": {"note": None}}


def assert_same(loaded: dict, state: dict) -> None:
    for key, value in state["model"].items():
        assert loaded["model"][key].dtype == value.dtype and torch.equal(loaded["model"][key], value), key
    assert torch.equal(loaded["transposed"], state["transposed"])
    assert loaded["extra"]["note"] == ["a", 1]


@pytest.mark.parametrize("codec", CHECKPOINT_CODECS)
def test_every_codec_round_trips_and_the_recorded_hash_is_the_files(tmp_path, codec):
    blobs, state = LocalBlobStore(tmp_path), sample_state()
    writer = LedgerStorageWriter(blobs, "blobs/c/e1", codec)
    dcp.save(state, storage_writer=writer, no_dist=True)
    assert [s.location for s in writer.written] == ["blobs/c/e1/__0_0.distcp", "blobs/c/e1/.metadata"]
    for shard in writer.written:  # hashed while written == hashed from disk
        assert blobs.hash_file(shard.location) == (shard.hash, shard.bytes)
    loaded = empty_like(state)
    dcp.load(loaded, storage_reader=LedgerStorageReader(blobs, "blobs/c/e1"), no_dist=True)
    assert_same(loaded, state)
    assert sorted(p.name for p in (tmp_path / "blobs/c/e1").iterdir()) == [".metadata", "__0_0.distcp"]


def test_tensors_are_their_raw_bytes_at_aligned_recorded_offsets(tmp_path, monkeypatch):
    blobs, state = LocalBlobStore(tmp_path), sample_state()
    saved = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, *a, **k: (saved.append(type(obj)), real_save(obj, *a, **k))[1])
    dcp.save(state, storage_writer=LedgerStorageWriter(blobs, "blobs/c/e1"), no_dist=True)
    assert torch.Tensor not in saved  # no torch.save container per tensor (only the pickled non-tensor item)

    metadata = pickle.loads((tmp_path / "blobs/c/e1/.metadata").read_bytes())
    data = (tmp_path / "blobs/c/e1/__0_0.distcp").read_bytes()
    tensors = {"model." + k: v for k, v in state["model"].items()} | {"transposed": state["transposed"]}
    for index, info in metadata.storage_data.items():
        if index.fqn not in tensors:
            continue
        tensor = tensors[index.fqn].contiguous()
        assert info.offset % ITEM_ALIGNMENT == 0
        assert info.transform_descriptors[-1].startswith("raw-tensor@ckpt-ledger/1;")
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        assert data[info.offset:info.offset + info.length] == raw, index.fqn


def test_dcp_own_reader_reads_the_files_with_our_registry_and_refuses_them_by_name_without(tmp_path):
    blobs, state = LocalBlobStore(tmp_path), sample_state()
    dcp.save(state, storage_writer=LedgerStorageWriter(blobs, "blobs/c/e1", "zstd"), no_dist=True)
    loaded = empty_like(state)
    dcp.load(loaded, storage_reader=FileSystemReader(tmp_path / "blobs/c/e1", _extension_registry=reader_registry()),
             no_dist=True)
    assert_same(loaded, state)
    with pytest.raises(BaseException, match="raw-tensor@ckpt-ledger"):  # DCP's CheckpointException
        dcp.load(empty_like(state), storage_reader=FileSystemReader(tmp_path / "blobs/c/e1"), no_dist=True)


def test_checkpoints_in_dcp_own_format_still_load(tmp_path):
    state = sample_state()
    dcp.save(state, storage_writer=FileSystemWriter(tmp_path / "blobs/old"), no_dist=True)
    loaded = empty_like(state)
    dcp.load(loaded, storage_reader=LedgerStorageReader(LocalBlobStore(tmp_path), "blobs/old"), no_dist=True)
    assert_same(loaded, state)


def test_a_truncated_file_is_an_error_not_short_tensors(tmp_path):
    blobs, state = LocalBlobStore(tmp_path), sample_state()
    dcp.save(state, storage_writer=LedgerStorageWriter(blobs, "blobs/c/e1"), no_dist=True)
    path = tmp_path / "blobs/c/e1/__0_0.distcp"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(BaseException, match="truncated"):
        dcp.load(empty_like(state), storage_reader=LedgerStorageReader(blobs, "blobs/c/e1"), no_dist=True)


# -- the Checkpointer on one real gloo rank ------------------------------------------------------


@pytest.fixture
def one_rank(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    ctx = init_distributed(60.0)
    yield ctx
    dist.destroy_process_group()


class GatedStore(LocalBlobStore):
    """A local store whose rank files wait for the test to open the gate (so it can act mid-checkpoint)."""

    def __init__(self, root) -> None:  # noqa: ANN001
        super().__init__(root)
        self.writing = threading.Event()
        self.gate = threading.Event()

    def open_atomic(self, location: str):  # noqa: ANN201
        if location.endswith(".distcp"):
            self.writing.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return super().open_atomic(location)


class GatedJournal(RunRecorder):
    """A recorder whose ``checkpoint.started`` waits for the test to open the gate."""

    gate: threading.Event

    def begin_checkpoint(self, *args, **kwargs) -> bool:  # noqa: ANN002, ANN003
        assert self.gate.wait(60), "the test never opened the gate"
        return super().begin_checkpoint(*args, **kwargs)


def start_attempt(recorder: RunRecorder) -> int:
    recorder.start_run({}, "cfg", None)
    return recorder.begin_attempt(world_size=1, stack="ddp", topology={"dp": 1, "tp": 1, "pp": 1}, resumed_from=None,
                                 slurm=None, previous_topology=None)


def checkpointer(ctx, blobs, recorder) -> Checkpointer:  # noqa: ANN001
    return Checkpointer(ctx, blobs, recorder, stack="ddp", topology={"dp": 1, "tp": 1, "pp": 1},
                        retention=RetentionPolicy(), background=True)


@pytest.mark.timeout(180)
def test_a_users_torch_save_during_a_background_checkpoint_behaves_normally(tmp_path, one_rank):
    store, recorder = GatedStore(tmp_path), RunRecorder(str(tmp_path))
    epoch = start_attempt(recorder)
    ckpt = checkpointer(one_rank, store, recorder)
    state = {"model": {"w": torch.randn(256, 256)}}
    assert ckpt.save_async(state, step=1, epoch=epoch) is None
    assert store.writing.wait(60)
    try:
        # The writer is mid-checkpoint: the process's own switches are as the user left them.
        assert gc.isenabled()
        from torch.utils.serialization import config as serialization_config
        assert serialization_config.save.compute_crc32
        saved = io.BytesIO()
        torch.save({"mine": torch.arange(1000.0)}, saved)
        with zipfile.ZipFile(io.BytesIO(saved.getvalue())) as archive:
            assert archive.testzip() is None  # every member's CRC32 is present and right
            assert all(info.CRC != 0 for info in archive.infolist() if info.file_size)
        saved.seek(0)
        assert torch.equal(torch.load(saved)["mine"], torch.arange(1000.0))
    finally:
        store.gate.set()
    outcome = ckpt.wait(timeout_s=60)
    assert outcome.committed
    view = recorder.projection()
    candidate = Candidate.of(view.checkpoints[outcome.checkpoint_id])
    assert ckpt.verify(candidate) == []
    loaded = {"model": {"w": torch.zeros(256, 256)}}
    ckpt.load(candidate, loaded)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    recorder.close()


@pytest.mark.timeout(180)
def test_checkpoint_started_and_its_metric_are_appended_by_the_writer_in_order(tmp_path, one_rank):
    recorder = GatedJournal(str(tmp_path))
    recorder.gate = threading.Event()
    recorder.gate.set()
    epoch = start_attempt(recorder)
    recorder.gate.clear()
    ckpt = checkpointer(one_rank, LocalBlobStore(tmp_path), recorder)
    try:
        assert ckpt.save_async({"w": torch.randn(64)}, step=5, epoch=epoch) is None
        # The training thread is back while checkpoint.started is still held up on the writer.
        assert "checkpoint.started" not in [e.tag for e in recorder.ledger.events()]
        ckpt.record_metric("eval_loss", 0.5, step=5, checkpoint_id=ckpt.in_flight)
        assert "metric.recorded" not in [e.tag for e in recorder.ledger.events()]
    finally:
        recorder.gate.set()
    outcome = ckpt.wait(timeout_s=60)
    assert outcome.committed
    tags = [e.tag for e in recorder.ledger.events() if e.tag != "alias.promoted"]  # latest/best history aside
    assert tags[tags.index("checkpoint.started"):] == [
        "checkpoint.started", "metric.recorded", "shard.written", "shard.written", "checkpoint.committed"]
    assert recorder.projection().checkpoints[outcome.checkpoint_id].status == "committed"
    recorder.close()


@pytest.mark.timeout(180)
def test_a_fenced_writer_removes_the_files_nothing_records(tmp_path, one_rank):
    store, recorder = GatedStore(tmp_path), RunRecorder(str(tmp_path))
    epoch = start_attempt(recorder)
    ckpt = checkpointer(one_rank, store, recorder)
    ckpt.save_async({"w": torch.randn(1000)}, step=3, epoch=epoch)
    assert store.writing.wait(60)
    newer = Ledger.open(tmp_path)  # a second attempt takes over while the files are being written
    newer.begin_attempt(world_size=1, stack="ddp")
    newer.close()
    store.gate.set()
    outcome = ckpt.wait(timeout_s=60)
    assert outcome.fenced and not outcome.committed and outcome.fenced_by == epoch + 1
    assert recorder.fenced_by == epoch + 1  # what the training loop acts on at its next step boundary
    assert list(store.list_files()) == []  # written, never recorded: removed
    recorder.close()


def test_projecting_the_ledger_off_the_main_thread_leaves_the_garbage_collector_alone(tmp_path):
    # The checkpoint writer applies retention (a projection) on its thread; the collector is process-wide.
    from ledger.events import StepCompleted

    led = Ledger.open(tmp_path)
    led.start_run(run_id="r", config={})
    attempt = led.begin_attempt(world_size=1, stack="ddp")
    # Small: the worker samples the collector's state at every Python call of its replay, so a
    # pause is seen however short the fold is (20,000 events, spin-sampled from the main thread
    # only, cost up to 30 s in a suite whose heap makes every collection on the worker slow).
    led.append_many([StepCompleted(step=i, metrics={"loss": 1.0}) for i in range(2000)], epoch=attempt.epoch)
    seen: set[bool] = set()
    seen_by_worker: set[bool] = set()
    done = threading.Event()

    def sample(frame, event, arg):  # noqa: ANN001, ANN202 - sys.settrace's signature
        seen_by_worker.add(gc.isenabled())

    def project() -> None:
        sys.settrace(sample)  # this thread only
        try:
            for _ in range(3):
                Ledger.open(tmp_path, read_only=True).full_replay()
        finally:
            sys.settrace(None)
            done.set()

    worker = threading.Thread(target=project)
    worker.start()
    while not done.is_set():
        seen.add(gc.isenabled())
    worker.join()
    led.close()
    assert seen == {True}
    assert seen_by_worker == {True}
