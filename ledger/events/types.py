"""Every lifecycle fact of a training run, as a frozen msgspec Struct.

The log is a persisted format that users' own tools read, so the tags, class
names and fields here are public: add fields freely (with defaults), never rename
or retype one. Each class states its tag explicitly — a class rename never
breaks an old log — and carries ``SCHEMA`` (its current schema version); older
stored versions are brought forward by :mod:`ledger.events.upcasters`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Union

import msgspec

from ledger.statuses import ATTEMPT_END_REASONS  # noqa: F401 - re-exported by ledger.events


#: Every integer field: a 64-bit signed value. JSON would store a larger one, but snapshots and
#: the read model (msgpack) could not, and every later append would fail; refused at encode instead.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="tag"):
    """Base of all events. Subclasses are past-tense facts."""

    SCHEMA: ClassVar[int] = 1


class RunStarted(Event, tag="run.started"):
    """The run was created with this configuration and code."""

    run_id: str
    config: dict[str, Any] = {}
    config_hash: str = ""
    code_id: str | None = None
    """The user's training code: git commit (``-dirty-<hash>`` with uncommitted changes) of the tree
    holding the entry script; ``None`` outside git. Logs before ckpt-ledger 0.2 hold ckpt-ledger's own commit."""
    ledger_version: str | None = None
    """The ckpt-ledger version (and git commit, when run from a checkout) that wrote the run."""
    blobs: str | None = None
    """Where the shard blobs are: a directory or an fsspec URL such as ``s3://bucket/prefix``,
    never with credentials; ``None``: the run directory."""


class AttemptStarted(Event, tag="attempt.started"):
    """A new attempt (job, requeue or restart) began; ``epoch`` fences all older ones."""

    epoch: Int64
    job_id: str | None = None
    slurm: dict[str, Any] | None = None
    host: str = ""
    pid: Int64 = 0
    world_size: Int64 = 1
    stack: str = ""
    topology: dict[str, int] = {}
    resumed_from: str | None = None
    previous_topology: dict[str, Any] | None = None


class StepCompleted(Event, tag="step.completed"):
    """A training step finished (metrics may be sampled)."""

    step: Int64
    metrics: dict[str, float] = {}


class CheckpointStarted(Event, tag="checkpoint.started"):
    """A checkpoint began; ``ranks`` are the writers whose shards must all arrive before commit."""

    checkpoint_id: str
    step: Int64
    ranks: list[Int64] = []
    world_size: Int64 = 1
    stack: str = ""
    topology: dict[str, int] = {}


class ShardWritten(Event, tag="shard.written"):
    """One file of a checkpoint is durably written (fsynced and renamed into place)."""

    SCHEMA: ClassVar[int] = 2  # v1 had no ``codec`` (everything was stored raw)

    checkpoint_id: str
    rank: Int64
    location: str
    bytes: Int64
    hash: str
    codec: str = "none"


class CheckpointCommitted(Event, tag="checkpoint.committed"):
    """Every expected rank's shards are durable: the checkpoint may be resumed from."""

    checkpoint_id: str
    step: Int64


class CheckpointAborted(Event, tag="checkpoint.aborted"):
    """The checkpoint will never be committed."""

    checkpoint_id: str
    reason: str = ""


class MetricRecorded(Event, tag="metric.recorded"):
    """A metric (e.g. an eval loss) was measured, possibly long after its checkpoint."""

    name: str
    value: float
    step: Int64
    checkpoint_id: str | None = None


class AliasPromoted(Event, tag="alias.promoted"):
    """An alias (``latest``, ``best`` or a user name) now points at a checkpoint."""

    alias: str
    checkpoint_id: str
    reason: str = ""


class AliasRemoved(Event, tag="alias.removed"):
    """A user alias no longer points at anything (``ckpt-ledger unalias``)."""

    alias: str
    reason: str = ""


class CheckpointPinned(Event, tag="checkpoint.pinned"):
    """The checkpoint is exempt from retention until unpinned."""

    checkpoint_id: str


class CheckpointUnpinned(Event, tag="checkpoint.unpinned"):
    """A pin was lifted."""

    checkpoint_id: str


class CheckpointDeletionRequested(Event, tag="checkpoint.deletion_requested"):
    """Retention decided to delete the checkpoint; appended before any blob is removed."""

    checkpoint_id: str
    reason: str = ""


class CheckpointDeleted(Event, tag="checkpoint.deleted"):
    """All of the checkpoint's blobs are gone."""

    checkpoint_id: str


class PreemptionSignalled(Event, tag="preemption.signalled"):
    """The scheduler asked the job to stop (SIGTERM/SIGUSR1); state is being saved."""

    signal: str
    step: Int64


class AttemptEnded(Event, tag="attempt.ended"):
    """An attempt ended: ``completed``, ``preempted``, ``failed``, ``fenced`` or ``crashed``.

    ``fenced`` is recorded by the fenced job itself (as an operator write: its own epoch is
    refused), ``crashed`` by an operator (``ckpt-ledger end-attempt``) for a job whose processes are gone.
    """

    epoch: Int64
    reason: str
    last_step: Int64 | None = None
    fenced_by: Int64 | None = None
    """For ``fenced``: the epoch of the attempt that took over."""


class CorruptionDetected(Event, tag="corruption.detected"):
    """A shard failed verification; the checkpoint must never be loaded."""

    checkpoint_id: str
    location: str
    expected_hash: str | None = None
    found_hash: str | None = None


#: The union of every event type — the type of one log entry's payload.
AnyEvent = Union[
    RunStarted,
    AttemptStarted,
    StepCompleted,
    CheckpointStarted,
    ShardWritten,
    CheckpointCommitted,
    CheckpointAborted,
    MetricRecorded,
    AliasPromoted,
    AliasRemoved,
    CheckpointPinned,
    CheckpointUnpinned,
    CheckpointDeletionRequested,
    CheckpointDeleted,
    PreemptionSignalled,
    AttemptEnded,
    CorruptionDetected,
]

EVENT_CLASSES: tuple[type[Event], ...] = AnyEvent.__args__  # type: ignore[attr-defined]

#: tag -> class, e.g. ``"checkpoint.committed" -> CheckpointCommitted``.
EVENT_TYPES: dict[str, type[Event]] = {cls.__struct_config__.tag: cls for cls in EVENT_CLASSES}


def tag_of(event: Event) -> str:
    """The stable string tag of an event instance."""
    return type(event).__struct_config__.tag
