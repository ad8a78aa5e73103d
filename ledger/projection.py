"""The projection: a fold of the event log into the state every decision is made from.

``apply(state, event, envelope) -> state`` is deterministic and free of I/O: the
same log always folds into the same state, whatever the wall clock or the file
system say. For speed on million-event logs it updates ``state`` in place and
returns it; the fold owns the state it is given (:func:`fold` starts from a fresh
or decoded snapshot), so no caller ever sees a state change under it.

Facts that do not fit the protocol (a shard for an unknown checkpoint, a commit
after an abort) are kept as ``anomalies`` for ``audit`` instead of raising: the
log is history, and history is not refused after the fact.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import msgspec
import numpy as np

from ledger.events import (
    AliasPromoted,
    AliasRemoved,
    AttemptEnded,
    AttemptStarted,
    CheckpointAborted,
    CheckpointCommitted,
    CheckpointDeleted,
    CheckpointDeletionRequested,
    CheckpointPinned,
    CheckpointStarted,
    CheckpointUnpinned,
    CorruptionDetected,
    Event,
    MetricRecorded,
    PreemptionSignalled,
    RunStarted,
    ShardWritten,
    StepCompleted,
)
from ledger.statuses import AttemptStatus, CheckpointStatus
from ledger.store.interface import EventChunk, StepRun

#: Bump when the state layout or fold rules change: older snapshots are then ignored.
#: 2: ``CheckpointState.committed_at``. 3: lineage (``CheckpointState.parent``,
#: ``AttemptState.head``/``fenced_by``), alias removal, ``RunInfo.ledger_version``.
PROJECTION_VERSION = 3


class RunInfo(msgspec.Struct, kw_only=True):
    """Identity of the run (from ``run.started``)."""

    run_id: str
    config: dict[str, Any]
    config_hash: str
    code_id: str | None
    ledger_version: str | None = None


class ShardState(msgspec.Struct, kw_only=True):
    """One recorded shard file of a checkpoint."""

    rank: int
    location: str
    bytes: int
    hash: str
    codec: str


class CheckpointState(msgspec.Struct, kw_only=True):
    """Everything the log says about one checkpoint. Treat as read-only."""

    checkpoint_id: str
    step: int
    epoch: int
    started_seq: int
    ranks: list[int]
    world_size: int
    stack: str
    topology: dict[str, int]
    status: CheckpointStatus = CheckpointStatus.IN_FLIGHT
    shards: list[ShardState] = []
    committed_seq: int | None = None
    committed_at: float | None = None  # recorded_at of the commit: only time-based retention reads it
    abort_reason: str | None = None
    deletion_requested: bool = False  # status becomes DELETED at the request: never load it again
    deletion_done: bool = False  # checkpoint.deleted seen: every blob is gone
    deletion_reason: str | None = None
    pinned: bool = False
    corrupt_locations: list[str] = []
    metrics: dict[str, float] = {}
    parent: str | None = None
    """The checkpoint this one's weights descend from: its attempt's previous (not aborted) checkpoint,
    or the checkpoint the attempt resumed from; ``None`` for a run's first checkpoint (a root)."""

    @property
    def bytes(self) -> int:
        """Total stored bytes over all shards."""
        return sum(s.bytes for s in self.shards)

    @property
    def usable(self) -> bool:
        """Committed, not corrupt, not (being) deleted: safe to load."""
        return self.status == CheckpointStatus.COMMITTED


class AttemptState(msgspec.Struct, kw_only=True):
    """One attempt (a job, requeue or restart), keyed by its fencing epoch."""

    epoch: int
    started_seq: int
    started_at: float
    job_id: str | None
    slurm: dict[str, Any] | None
    host: str
    pid: int
    world_size: int
    stack: str
    topology: dict[str, int]
    resumed_from: str | None
    previous_topology: dict[str, Any] | None
    first_step: int
    status: str = AttemptStatus.RUNNING
    """An :class:`~ledger.statuses.AttemptStatus` value: ``running``, ``crashed``, or the ``attempt.ended`` reason
    as the log recorded it (a plain ``str`` when read back; the enum compares equal to it)."""
    reason: str | None = None
    ended_at: float | None = None
    ended_seq: int | None = None
    last_step: int | None = None
    last_seq: int = 0
    steps_run: int = 0
    steps_lost: int = 0
    preempted_by: str | None = None
    head: str | None = None
    """The attempt's newest checkpoint not aborted (at first the one it resumed from): the parent of its next."""
    fenced_by: int | None = None
    """The epoch that fenced this attempt (status ``fenced``), when the log says so."""


class State(msgspec.Struct, kw_only=True):
    """The whole projection: the fold of events ``1..seq``."""

    seq: int = 0
    run: RunInfo | None = None
    checkpoints: dict[str, CheckpointState] = {}
    attempts: dict[int, AttemptState] = {}
    current_epoch: int = 0
    last_step: int | None = None
    steps_run: int = 0
    steps_lost: int = 0
    aliases: dict[str, str] = {}
    metrics_by_step: dict[int, dict[str, float]] = {}
    anomalies: list[str] = []


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(State)


def encode_state(state: State) -> bytes:
    """Serialize a state (for snapshots and copies)."""
    return _encoder.encode(state)


def decode_state(data: bytes) -> State:
    """Inverse of :func:`encode_state`."""
    with _gc_paused():  # a 10k-checkpoint state is ~10^5 acyclic objects: collections only slow it down
        return _decoder.decode(data)


def _anomaly(state: State, seq: int, message: str) -> None:
    state.anomalies.append(f"seq {seq}: {message}")


def _checkpoint(state: State, seq: int, checkpoint_id: str, what: str) -> CheckpointState | None:
    ckpt = state.checkpoints.get(checkpoint_id)
    if ckpt is None:
        _anomaly(state, seq, f"{what} for unknown checkpoint {checkpoint_id}")
    return ckpt


def _current_attempt(state: State) -> AttemptState | None:
    return state.attempts.get(state.current_epoch)


def apply(state: State, event: Event, *, seq: int, epoch: int, recorded_at: float) -> State:
    """Fold one event (with its envelope fields) into ``state`` and return it."""
    state.seq = seq
    attempt = state.attempts.get(epoch)
    if attempt is not None:
        attempt.last_seq = seq
    handler = _handler_for(type(event))
    if handler is not None:
        handler(state, event, seq, epoch, recorded_at, attempt)
    return state


def _on_shard_written(state: State, event: ShardWritten, seq: int, epoch: int, recorded_at: float,
                      attempt: AttemptState | None) -> None:
    ckpt = _checkpoint(state, seq, event.checkpoint_id, "shard.written")
    if ckpt is not None:
        ckpt.shards = [s for s in ckpt.shards if s.location != event.location]
        ckpt.shards.append(
            ShardState(rank=event.rank, location=event.location, bytes=event.bytes, hash=event.hash, codec=event.codec)
        )


def _on_checkpoint_started(state: State, event: CheckpointStarted, seq: int, epoch: int, recorded_at: float,
                           attempt: AttemptState | None) -> None:
    if event.checkpoint_id in state.checkpoints:
        _anomaly(state, seq, f"checkpoint {event.checkpoint_id} started twice")
    else:
        state.checkpoints[event.checkpoint_id] = CheckpointState(
            checkpoint_id=event.checkpoint_id,
            step=event.step,
            epoch=epoch,
            started_seq=seq,
            ranks=list(event.ranks),
            world_size=event.world_size,
            stack=event.stack,
            topology=dict(event.topology),
            parent=attempt.head if attempt is not None else None,
        )
        if attempt is not None:
            attempt.head = event.checkpoint_id


def _on_committed(state: State, event: CheckpointCommitted, seq: int, epoch: int, recorded_at: float,
                  attempt: AttemptState | None) -> None:
    ckpt = _checkpoint(state, seq, event.checkpoint_id, "checkpoint.committed")
    if ckpt is not None:
        if ckpt.status != CheckpointStatus.IN_FLIGHT:
            _anomaly(state, seq, f"commit of {event.checkpoint_id} while {ckpt.status}")
        else:
            ckpt.status = CheckpointStatus.COMMITTED
            ckpt.committed_seq = seq
            ckpt.committed_at = recorded_at


def _on_aborted(state: State, event: CheckpointAborted, seq: int, epoch: int, recorded_at: float,
                attempt: AttemptState | None) -> None:
    ckpt = _checkpoint(state, seq, event.checkpoint_id, "checkpoint.aborted")
    if ckpt is not None:
        if ckpt.status == CheckpointStatus.IN_FLIGHT:
            ckpt.status = CheckpointStatus.ABORTED
            # An aborted save holds no weights: the attempt's next checkpoint descends from its parent.
            owner = state.attempts.get(ckpt.epoch)
            if owner is not None and owner.head == ckpt.checkpoint_id:
                owner.head = ckpt.parent
        ckpt.abort_reason = event.reason


def _on_metric(state: State, event: MetricRecorded, seq: int, epoch: int, recorded_at: float,
               attempt: AttemptState | None) -> None:
    state.metrics_by_step.setdefault(event.step, {})[event.name] = event.value
    if event.checkpoint_id is not None:
        ckpt = _checkpoint(state, seq, event.checkpoint_id, "metric.recorded")
        if ckpt is not None:
            ckpt.metrics[event.name] = event.value


def _on_alias(state: State, event: AliasPromoted, seq: int, epoch: int, recorded_at: float,
              attempt: AttemptState | None) -> None:
    if _checkpoint(state, seq, event.checkpoint_id, f"alias {event.alias}") is not None:
        state.aliases[event.alias] = event.checkpoint_id


def _on_alias_removed(state: State, event: AliasRemoved, seq: int, epoch: int, recorded_at: float,
                      attempt: AttemptState | None) -> None:
    if state.aliases.pop(event.alias, None) is None:
        _anomaly(state, seq, f"alias {event.alias} removed but it pointed at nothing")


def _on_pin(state: State, event: CheckpointPinned | CheckpointUnpinned, seq: int, epoch: int, recorded_at: float,
            attempt: AttemptState | None) -> None:
    ckpt = _checkpoint(state, seq, event.checkpoint_id, "pin")
    if ckpt is not None:
        ckpt.pinned = isinstance(event, CheckpointPinned)


def _on_deletion_requested(state: State, event: CheckpointDeletionRequested, seq: int, epoch: int,
                           recorded_at: float, attempt: AttemptState | None) -> None:
    ckpt = _checkpoint(state, seq, event.checkpoint_id, "deletion request")
    if ckpt is not None:
        ckpt.deletion_requested = True
        ckpt.deletion_reason = event.reason
        ckpt.status = CheckpointStatus.DELETED


def _on_deleted(state: State, event: CheckpointDeleted, seq: int, epoch: int, recorded_at: float,
                attempt: AttemptState | None) -> None:
    ckpt = _checkpoint(state, seq, event.checkpoint_id, "checkpoint.deleted")
    if ckpt is not None:
        ckpt.status = CheckpointStatus.DELETED
        ckpt.deletion_requested = True
        ckpt.deletion_done = True
        state.aliases = {a: c for a, c in state.aliases.items() if c != event.checkpoint_id}


def _on_corruption(state: State, event: CorruptionDetected, seq: int, epoch: int, recorded_at: float,
                   attempt: AttemptState | None) -> None:
    ckpt = _checkpoint(state, seq, event.checkpoint_id, "corruption.detected")
    if ckpt is not None:
        if event.location not in ckpt.corrupt_locations:
            ckpt.corrupt_locations.append(event.location)
        if ckpt.status in (CheckpointStatus.COMMITTED, CheckpointStatus.IN_FLIGHT):
            ckpt.status = CheckpointStatus.CORRUPT


def _on_attempt_ended(state: State, event: AttemptEnded, seq: int, epoch: int, recorded_at: float,
                      attempt: AttemptState | None) -> None:
    ended = state.attempts.get(event.epoch)
    if ended is None:
        _anomaly(state, seq, f"attempt.ended for unknown epoch {event.epoch}")
    else:
        ended.status = event.reason
        ended.reason = event.reason
        ended.ended_at = recorded_at
        ended.ended_seq = seq
        if event.last_step is not None:
            ended.last_step = event.last_step
        if event.reason == AttemptStatus.FENCED:
            ended.fenced_by = event.fenced_by if event.fenced_by is not None else _next_epoch(state, event.epoch)


def _next_epoch(state: State, epoch: int) -> int | None:
    """The first epoch begun after ``epoch``: the one that fenced it."""
    return min((e for e in state.attempts if e > epoch), default=None)


def _on_preemption(state: State, event: PreemptionSignalled, seq: int, epoch: int, recorded_at: float,
                   attempt: AttemptState | None) -> None:
    if attempt is not None:
        attempt.preempted_by = event.signal


def _on_run_started(state: State, event: RunStarted, seq: int, epoch: int, recorded_at: float,
                    attempt: AttemptState | None) -> None:
    if state.run is None:
        state.run = RunInfo(
            run_id=event.run_id, config=dict(event.config), config_hash=event.config_hash, code_id=event.code_id,
            ledger_version=event.ledger_version,
        )
    else:
        _anomaly(state, seq, "run.started appended twice")


def _on_step(state: State, event: StepCompleted, seq: int, epoch: int, recorded_at: float,
             attempt: AttemptState | None) -> None:
    step = event.step
    if attempt is not None:
        # Count by step deltas, not events: step.completed may be sampled.
        previous = attempt.last_step if attempt.last_step is not None else attempt.first_step
        if step > previous:
            attempt.steps_run += step - previous
            state.steps_run += step - previous
        attempt.last_step = step
    state.last_step = step


def _on_attempt_started(state: State, event: AttemptStarted, seq: int, epoch: int, recorded_at: float,
                        attempt: AttemptState | None) -> None:
    _apply_attempt_started(state, event, seq, recorded_at)


def _apply_attempt_started(state: State, event: AttemptStarted, seq: int, recorded_at: float) -> None:
    resumed_ckpt = state.checkpoints.get(event.resumed_from) if event.resumed_from else None
    first_step = resumed_ckpt.step if resumed_ckpt is not None else 0
    if event.resumed_from and resumed_ckpt is None:
        _anomaly(state, seq, f"attempt {event.epoch} resumed from unknown checkpoint {event.resumed_from}")
    # Work done past the point this attempt restarts from is lost to the restart.
    frontier = state.last_step or 0
    lost = max(0, frontier - first_step)
    previous = state.attempts.get(state.current_epoch)
    if previous is not None:
        previous.steps_lost += lost
        if previous.status == AttemptStatus.RUNNING:
            previous.status = AttemptStatus.CRASHED
    state.steps_lost += lost
    state.attempts[event.epoch] = AttemptState(
        epoch=event.epoch,
        started_seq=seq,
        started_at=recorded_at,
        job_id=event.job_id,
        slurm=event.slurm,
        host=event.host,
        pid=event.pid,
        world_size=event.world_size,
        stack=event.stack,
        topology=dict(event.topology),
        resumed_from=event.resumed_from,
        previous_topology=event.previous_topology,
        first_step=first_step,
        last_seq=seq,
        head=event.resumed_from if resumed_ckpt is not None else None,
    )
    state.current_epoch = max(state.current_epoch, event.epoch)
    if state.last_step is not None or resumed_ckpt is not None:
        state.last_step = first_step


#: Event type -> its fold rule. A dict lookup on the exact type replaces an isinstance
#: chain, which was a measurable share of replaying a million events.
_HANDLERS: dict[type, Callable[..., None]] = {
    StepCompleted: _on_step,
    ShardWritten: _on_shard_written,
    CheckpointStarted: _on_checkpoint_started,
    CheckpointCommitted: _on_committed,
    CheckpointAborted: _on_aborted,
    MetricRecorded: _on_metric,
    AliasPromoted: _on_alias,
    AliasRemoved: _on_alias_removed,
    CheckpointPinned: _on_pin,
    CheckpointUnpinned: _on_pin,
    CheckpointDeletionRequested: _on_deletion_requested,
    CheckpointDeleted: _on_deleted,
    CorruptionDetected: _on_corruption,
    AttemptStarted: _on_attempt_started,
    AttemptEnded: _on_attempt_ended,
    PreemptionSignalled: _on_preemption,
    RunStarted: _on_run_started,
}


def _handler_for(event_type: type) -> Callable[..., None] | None:
    handler = _HANDLERS.get(event_type)
    if handler is None:  # a subclass of an event type folds like its base
        handler = next((_HANDLERS[c] for c in event_type.__mro__ if c in _HANDLERS), None)
    return handler


def fold(events: Iterable[Any], state: State | None = None) -> State:
    """Fold stored events (objects with ``seq``, ``epoch``, ``recorded_at``, ``event``) into a state."""
    state = state if state is not None else State()
    for stored in events:
        apply(state, stored.event, seq=stored.seq, epoch=stored.epoch, recorded_at=stored.recorded_at)
    return state


def fold_chunks(chunks: Iterable[EventChunk | StepRun], state: State | None = None) -> State:
    """Like :func:`fold`, over column chunks (the replay fast path): ``(seqs, epochs, recorded_ats,
    events)`` chunks, and :class:`~ledger.store.StepRun` columns of step events.

    Same result as :func:`apply` per event; the loop is inlined because at a million
    events every attribute lookup and call per event shows.
    """
    state = state if state is not None else State()
    attempts = state.attempts
    handlers = _HANDLERS
    with _gc_paused():
        for chunk in chunks:
            if type(chunk) is StepRun:
                _fold_step_run(state, chunk)
                continue
            seqs, epochs, recorded, events = chunk
            for seq, epoch, recorded_at, event in zip(seqs, epochs, recorded, events):
                attempt = attempts.get(epoch)
                if attempt is not None:
                    attempt.last_seq = seq
                handler = handlers.get(type(event)) or _handler_for(type(event))
                if handler is not None:
                    handler(state, event, seq, epoch, recorded_at, attempt)
            if seqs:
                state.seq = seqs[-1]
    return state


def _fold_step_run(state: State, run: StepRun) -> None:
    """:func:`_on_step` for each step of ``run`` in turn, with the per-step work done by numpy.

    Per attempt, ``steps_run`` grows by every rise of the step from the attempt's previous
    one: the sum of the positive differences of its steps, the first taken from where the
    attempt stood. The store only hands over steps below 10**12, so no sum overflows.
    """
    steps, epochs = run.steps, run.epochs
    if not len(steps):
        return
    first_epoch = epochs[0]
    groups = [(first_epoch, None)] if (epochs == first_epoch).all() else [(e, epochs == e) for e in np.unique(epochs)]
    for epoch, rows in groups:
        attempt = state.attempts.get(int(epoch))
        if attempt is None:
            continue
        mine, seqs = (steps, run.seqs) if rows is None else (steps[rows], run.seqs[rows])
        previous = attempt.last_step if attempt.last_step is not None else attempt.first_step
        gained = max(int(mine[0]) - previous, 0) + int(np.maximum(np.diff(mine), 0).sum())
        attempt.steps_run += gained
        state.steps_run += gained
        attempt.last_step = int(mine[-1])
        attempt.last_seq = int(seqs[-1])
    state.last_step = int(steps[-1])
    state.seq = int(run.seqs[-1])


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while folding.

    Decoding a chunk (or a snapshot) allocates thousands of acyclic, GC-tracked objects;
    with the collector running, its generation scans cost ~30% of a replay and up to
    half of a large snapshot's decode. Reference counting still frees every event as
    soon as it is folded.

    Only on the main thread: the collector is process-wide, and a background thread (the
    trainer's checkpoint writer applying retention) must not switch it off under the
    user's code.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
