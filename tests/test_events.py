"""Events: codec round trips for every tag, the real v1 upcast, and loud failures naming the seq."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import pytest

from ledger import CorruptLedgerError, Ledger, SchemaTooNewError, UnknownEventError
from ledger.events import EVENT_TYPES, ShardWritten, decode, encode, schema_of, tag_of
from ledger.events import types as event_types
from ledger.store import raw

# One fully populated instance per tag. The test below fails if a tag is added without one here.
SAMPLES = {
    "run.started": event_types.RunStarted(run_id="r1", config={"lr": 0.1, "nested": {"a": [1, 2]}},
                                          config_hash="sha256:ab", code_id="deadbeef-dirty"),
    "attempt.started": event_types.AttemptStarted(
        epoch=3, job_id="123", slurm={"job_id": "123", "restart_count": 1, "array_task": None}, host="h", pid=42,
        world_size=4, stack="fsdp", topology={"tp": 1, "pp": 1, "dp": 4}, resumed_from="ckpt-10",
        previous_topology={"tp": 2, "pp": 1, "dp": 2},
    ),
    "step.completed": event_types.StepCompleted(step=7, metrics={"loss": 1.25, "lr": 1e-4}),
    "checkpoint.started": event_types.CheckpointStarted(checkpoint_id="c1", step=7, ranks=[0, 1], world_size=2,
                                                        stack="ddp", topology={"tp": 1, "pp": 1, "dp": 2}),
    "shard.written": event_types.ShardWritten(checkpoint_id="c1", rank=1, location="blobs/c1/e1/rank1.bin",
                                              bytes=10, hash="blake2b:00ff", codec="zstd"),
    "checkpoint.committed": event_types.CheckpointCommitted(checkpoint_id="c1", step=7),
    "checkpoint.aborted": event_types.CheckpointAborted(checkpoint_id="c1", reason="rank 1 died"),
    "metric.recorded": event_types.MetricRecorded(name="eval_loss", value=-0.5, step=7, checkpoint_id="c1"),
    "alias.promoted": event_types.AliasPromoted(alias="golden", checkpoint_id="c1", reason="user"),
    "alias.removed": event_types.AliasRemoved(alias="golden", reason="user"),
    "checkpoint.pinned": event_types.CheckpointPinned(checkpoint_id="c1"),
    "checkpoint.unpinned": event_types.CheckpointUnpinned(checkpoint_id="c1"),
    "checkpoint.deletion_requested": event_types.CheckpointDeletionRequested(checkpoint_id="c1", reason="keep-last 1"),
    "checkpoint.deleted": event_types.CheckpointDeleted(checkpoint_id="c1"),
    "preemption.signalled": event_types.PreemptionSignalled(signal="SIGTERM", step=9),
    "attempt.ended": event_types.AttemptEnded(epoch=3, reason="preempted", last_step=9),
    "corruption.detected": event_types.CorruptionDetected(checkpoint_id="c1", location="blobs/c1/e1/rank1.bin",
                                                          expected_hash="blake2b:00", found_hash=None),
}


def test_every_tag_has_a_sample():
    assert set(SAMPLES) == set(EVENT_TYPES)


@pytest.mark.parametrize("tag", sorted(EVENT_TYPES))
def test_round_trip_every_tag(tag):
    event = SAMPLES[tag]
    assert tag_of(event) == tag
    payload = encode(event)
    assert msgspec.json.decode(payload)["tag"] == tag  # the tag is stored explicitly, in the payload
    assert decode(payload, tag=tag, schema_version=schema_of(tag), seq=1) == event


@pytest.mark.parametrize("tag", sorted(EVENT_TYPES))
def test_round_trip_through_a_real_ledger(tmp_path, tag):
    with Ledger.open(tmp_path) as led:
        seq = led.append(SAMPLES[tag])
    stored = Ledger.open(tmp_path, read_only=True).events()
    assert [(s.seq, s.tag, s.event) for s in stored] == [(seq, tag, SAMPLES[tag])]


def test_v1_shard_written_upcasts_codec_and_unprefixed_hash():
    v1 = b'{"tag":"shard.written","checkpoint_id":"c1","rank":0,"location":"blobs/c1/e1/r0","bytes":3,"hash":"abcd"}'
    event = decode(v1, tag="shard.written", schema_version=1, seq=5)
    assert event == ShardWritten(checkpoint_id="c1", rank=0, location="blobs/c1/e1/r0", bytes=3,
                                 hash="blake2b:abcd", codec="none")


def test_v1_shard_written_keeps_a_prefixed_hash():
    v1 = b'{"tag":"shard.written","checkpoint_id":"c1","rank":0,"location":"l","bytes":3,"hash":"sha256:ab"}'
    assert decode(v1, tag="shard.written", schema_version=1, seq=5).hash == "sha256:ab"


def _inject(run_dir: Path, *, tag: str, schema_version: int, payload: str) -> int:
    """Add a raw row to a real ledger, as a newer or broken tool might have; returns its seq."""
    with raw.connect(run_dir / "ledger.db") as conn:
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events").fetchone()[0]
        conn.execute(
            "INSERT INTO events (seq, event_id, epoch, recorded_at, tag, schema_version, payload) "
            "VALUES (?, ?, 0, 0.0, ?, ?, ?)",
            (seq, f"injected-{seq}", tag, schema_version, payload),
        )
    conn.close()
    return seq


@pytest.fixture
def populated(tmp_path) -> Path:
    with Ledger.open(tmp_path) as led:
        led.start_run(run_id="r", config={})
        led.begin_attempt()
    return tmp_path


def test_real_v1_row_is_upcast_when_read(populated):
    seq = _inject(populated, tag="shard.written", schema_version=1,
                  payload='{"tag":"shard.written","checkpoint_id":"c","rank":0,"location":"x","bytes":1,"hash":"ff"}')
    ro = Ledger.open(populated, read_only=True)
    stored = ro.events()[-1]
    assert (stored.seq, stored.schema_version) == (seq, 1)
    assert (stored.event.hash, stored.event.codec) == ("blake2b:ff", "none")


@pytest.mark.parametrize(
    ("tag", "schema_version", "payload", "error"),
    [
        ("model.exploded", 1, '{"tag":"model.exploded"}', UnknownEventError),
        ("checkpoint.committed", 2, '{"tag":"checkpoint.committed","checkpoint_id":"c","step":1}', SchemaTooNewError),
        ("checkpoint.committed", 1, '{"tag":"checkpoint.committed","checkpoint_id":"c"', CorruptLedgerError),
        ("checkpoint.committed", 1, '{"tag":"checkpoint.committed","checkpoint_id":7,"step":1}', CorruptLedgerError),
        ("checkpoint.committed", 1, '{"tag":"checkpoint.aborted","checkpoint_id":"c"}', CorruptLedgerError),
    ],
    ids=["unknown-tag", "schema-too-new", "truncated-json", "wrong-field-type", "tag-mismatch"],
)
def test_bad_rows_fail_loudly_naming_the_seq(populated, tag, schema_version, payload, error):
    seq = _inject(populated, tag=tag, schema_version=schema_version, payload=payload)
    _inject(populated, tag="step.completed", schema_version=1, payload='{"tag":"step.completed","step":1}')
    ro = Ledger.open(populated, read_only=True)
    for read in (ro.events, ro.projection, ro.full_replay):
        with pytest.raises(error, match=rf"\bseq {seq}\b"):
            read()
    # The events before it are still readable: the bad row is reported, never skipped silently.
    assert [s.seq for s in ro.events(until_seq=seq - 1)] == list(range(1, seq))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_at_append_not_stored(tmp_path, bad):
    # JSON has no NaN/inf: msgspec would store null, and every later read of the log would fail.
    with Ledger.open(tmp_path) as led:
        led.append(event_types.StepCompleted(step=1))
        with pytest.raises(ValueError, match="metric.recorded"):
            led.append(event_types.MetricRecorded(name="eval_loss", value=bad, step=1))
        with pytest.raises(ValueError, match="step.completed"):
            led.append(event_types.StepCompleted(step=2, metrics={"loss": bad}))
        assert [s.seq for s in led.events()] == [1]
        led.projection()


def test_ill_typed_event_is_refused_at_append(tmp_path):
    # Struct constructors do not type-check; an ill-typed event must not poison the log.
    with Ledger.open(tmp_path) as led:
        with pytest.raises(ValueError, match="checkpoint.committed"):
            led.append(event_types.CheckpointCommitted(checkpoint_id="c", step="7"))  # type: ignore[arg-type]
        assert led.max_seq() == 0
