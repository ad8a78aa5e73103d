"""Hypothesis strategies for event logs: protocol-following ones and arbitrary (implausible) ones.

A generated log is a list of :class:`Entry`: an event plus how it is appended —
``"begin"`` (through ``begin_attempt``, which assigns the next epoch), ``"current"``
(under the newest epoch) or ``"operator"`` (epoch 0, never fenced). Small id pools
make collisions (a commit after an abort, a shard for an unknown checkpoint, a
metric for a deleted checkpoint) common.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from hypothesis import strategies as st

from ledger import Ledger
from ledger.events import (
    AliasPromoted,
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

CHECKPOINT_IDS = ("c0", "c1", "c2", "c3", "c4", "c5")
METRICS = ("eval_loss", "acc")
ALIASES = ("latest", "best", "golden", "release")


@dataclass(frozen=True)
class Entry:
    """One event of a generated log and how it is appended."""

    event: Event
    how: str  # "begin" | "current" | "operator"


@dataclass(frozen=True)
class FakeStored:
    """A stored event as the projection sees it, without SQLite (for pure folds)."""

    seq: int
    epoch: int
    recorded_at: float
    event: Event


def as_stored(entries: Iterable[Entry]) -> list[FakeStored]:
    """Number entries as the store would (seq from 1, epochs from begin), with a fake clock."""
    out, epoch = [], 0
    for i, entry in enumerate(entries):
        event = entry.event
        if entry.how == "begin":
            epoch += 1
            event = AttemptStarted(**{**_fields(event), "epoch": epoch})
        out.append(FakeStored(seq=i + 1, epoch=0 if entry.how == "operator" else epoch, recorded_at=float(i), event=event))
    return out


def append_all(led: Ledger, entries: Iterable[Entry]) -> None:
    """Append entries to a real ledger the way :func:`as_stored` numbers them."""
    epoch = 0
    for entry in entries:
        append_one(led, entry, epoch)
        if entry.how == "begin":
            epoch += 1


def append_one(led: Ledger, entry: Entry, epoch: int) -> int:
    """Append one entry; ``epoch`` is the newest epoch begun so far. Returns the seq."""
    if entry.how == "begin":
        fields = _fields(entry.event)
        fields.pop("epoch")
        return led.begin_attempt(**fields).seq
    return led.append(entry.event, epoch=None if entry.how == "operator" else epoch)


def _fields(event: Event) -> dict[str, Any]:
    return {f: getattr(event, f) for f in event.__struct_fields__}


# -- arbitrary events ------------------------------------------------------------------------------------------

ids = st.sampled_from(CHECKPOINT_IDS)
steps = st.integers(0, 40)
ranks = st.integers(0, 3)
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
locations = st.builds(lambda c, e, r: f"blobs/{c}/e{e}/rank{r}.bin", ids, st.integers(0, 3), ranks)
hashes = st.sampled_from(["blake2b:00", "blake2b:01", "blake2b:ff"])
small_text = st.sampled_from(["", "x", "keep-last 2", "rank 1 died"])

attempt_started = st.builds(
    AttemptStarted, epoch=st.integers(0, 6), job_id=st.none() | st.just("j1"), host=st.just("h"), pid=st.just(1),
    world_size=st.integers(1, 4), stack=st.sampled_from(["ddp", "fsdp"]),
    resumed_from=st.none() | ids,
)

any_event: st.SearchStrategy[Event] = st.one_of(
    st.builds(RunStarted, run_id=st.sampled_from(["r", "s"]),
              config=st.fixed_dictionaries({}, optional={"best_metric": st.sampled_from(METRICS),
                                                         "best_mode": st.sampled_from(["min", "max"])})),
    attempt_started,
    st.builds(StepCompleted, step=steps, metrics=st.dictionaries(st.sampled_from(["loss"]), finite, max_size=1)),
    st.builds(CheckpointStarted, checkpoint_id=ids, step=steps, ranks=st.lists(ranks, max_size=3, unique=True).map(sorted)),
    st.builds(ShardWritten, checkpoint_id=ids, rank=ranks, location=locations, bytes=st.integers(0, 100), hash=hashes),
    st.builds(CheckpointCommitted, checkpoint_id=ids, step=steps),
    st.builds(CheckpointAborted, checkpoint_id=ids, reason=small_text),
    st.builds(MetricRecorded, name=st.sampled_from(METRICS), value=finite, step=steps, checkpoint_id=st.none() | ids),
    st.builds(AliasPromoted, alias=st.sampled_from(ALIASES), checkpoint_id=ids),
    st.builds(CheckpointPinned, checkpoint_id=ids),
    st.builds(CheckpointUnpinned, checkpoint_id=ids),
    st.builds(CheckpointDeletionRequested, checkpoint_id=ids, reason=small_text),
    st.builds(CheckpointDeleted, checkpoint_id=ids),
    st.builds(PreemptionSignalled, signal=st.sampled_from(["SIGTERM", "SIGUSR1"]), step=steps),
    st.builds(AttemptEnded, epoch=st.integers(0, 6), reason=st.sampled_from(["completed", "preempted", "failed", "fenced"]),
              last_step=st.none() | steps),
    st.builds(CorruptionDetected, checkpoint_id=ids, location=locations, expected_hash=hashes,
              found_hash=st.none() | hashes),
)


@st.composite
def arbitrary_entry(draw) -> Entry:
    event = draw(any_event)
    if isinstance(event, AttemptStarted) and draw(st.booleans()):
        return Entry(event, "begin")
    return Entry(event, draw(st.sampled_from(["current", "operator"])))


# -- protocol-following logs -----------------------------------------------------------------------------------


@st.composite
def plausible_log(draw, max_actions: int = 40) -> list[Entry]:
    """A log a real trainer + gc could write: attempts, steps, two-phase checkpoints, late metrics, retention."""
    entries = [Entry(RunStarted(run_id="r", config=draw(st.sampled_from(
        [{}, {"best_metric": "acc", "best_mode": "max"}]))), "operator")]
    step, epoch, n = 0, 0, 0
    open_ckpts: dict[str, list[int]] = {}
    committed: list[tuple[str, int]] = []
    actions = draw(st.lists(st.sampled_from(
        ["attempt", "steps", "steps", "checkpoint", "save", "save", "save", "shard", "commit", "abort", "metric",
         "metric", "pin", "unpin", "delete", "alias", "corrupt", "end", "preempt"]), min_size=min(8, max_actions),
        max_size=max_actions))
    for action in actions:
        if action == "attempt" or epoch == 0:
            # Usually the highest step; sometimes an older one (`--resume ID`), so steps can go back.
            resumed = max(committed, key=lambda c: c[1], default=None)
            if committed and draw(st.integers(0, 3)) == 0:
                resumed = draw(st.sampled_from(committed))
            step = resumed[1] if resumed else 0
            epoch += 1
            entries.append(Entry(AttemptStarted(epoch=epoch, host="h", pid=1, resumed_from=resumed and resumed[0]), "begin"))
            open_ckpts.clear()
        elif action == "steps":
            step += draw(st.integers(1, 5))
            entries.append(Entry(StepCompleted(step=step, metrics={"loss": draw(finite)}), "current"))
        elif action in ("checkpoint", "save"):
            cid = f"k{n}"
            n += 1
            open_ckpts[cid] = draw(st.lists(ranks, min_size=1, max_size=3, unique=True))
            entries.append(Entry(CheckpointStarted(checkpoint_id=cid, step=step, ranks=sorted(open_ckpts[cid])), "current"))
            if action == "save":  # the whole two-phase protocol at once: the common case
                for rank in open_ckpts.pop(cid):
                    entries.append(Entry(ShardWritten(checkpoint_id=cid, rank=rank, location=f"blobs/{cid}/e{epoch}/r{rank}",
                                                      bytes=10, hash="blake2b:00"), "current"))
                committed.append((cid, step))
                entries.append(Entry(CheckpointCommitted(checkpoint_id=cid, step=step), "current"))
        elif action == "shard" and open_ckpts:
            cid = draw(st.sampled_from(sorted(open_ckpts)))
            if open_ckpts[cid]:
                rank = open_ckpts[cid].pop()
                entries.append(Entry(ShardWritten(checkpoint_id=cid, rank=rank, location=f"blobs/{cid}/e{epoch}/r{rank}",
                                                  bytes=10, hash="blake2b:00"), "current"))
        elif action == "commit" and open_ckpts:
            cid = draw(st.sampled_from(sorted(open_ckpts)))
            if not open_ckpts[cid]:
                del open_ckpts[cid]
                started = next(e.event for e in entries if isinstance(e.event, CheckpointStarted) and e.event.checkpoint_id == cid)
                committed.append((cid, started.step))
                entries.append(Entry(CheckpointCommitted(checkpoint_id=cid, step=started.step), "current"))
        elif action == "abort" and open_ckpts:
            cid = draw(st.sampled_from(sorted(open_ckpts)))
            del open_ckpts[cid]
            entries.append(Entry(CheckpointAborted(checkpoint_id=cid, reason="x"), "current"))
        elif action == "metric" and committed:
            cid, at = draw(st.sampled_from(committed))  # possibly long after later checkpoints: a late metric
            entries.append(Entry(MetricRecorded(name=draw(st.sampled_from(METRICS)), value=draw(finite), step=at,
                                                checkpoint_id=draw(st.sampled_from([cid, None]))), "current"))
        elif action in ("pin", "unpin", "alias", "corrupt") and (committed or open_ckpts):
            # Also saves still in flight (which may then be torn by the next attempt).
            cid = draw(st.sampled_from([c for c, _ in committed] + sorted(open_ckpts)))
            event = {"pin": CheckpointPinned(checkpoint_id=cid), "unpin": CheckpointUnpinned(checkpoint_id=cid),
                     "alias": AliasPromoted(alias=draw(st.sampled_from(ALIASES)), checkpoint_id=cid),
                     "corrupt": CorruptionDetected(checkpoint_id=cid, location=f"blobs/{cid}/x", expected_hash="blake2b:00")}
            entries.append(Entry(event[action], "operator"))
        elif action == "delete" and committed:
            cid, _ = committed.pop(draw(st.integers(0, len(committed) - 1)))
            entries.append(Entry(CheckpointDeletionRequested(checkpoint_id=cid, reason="gc"), "operator"))
            if draw(st.booleans()):  # else: gc crashed between the two
                entries.append(Entry(CheckpointDeleted(checkpoint_id=cid), "operator"))
        elif action == "end":
            entries.append(Entry(AttemptEnded(epoch=epoch, reason=draw(st.sampled_from(["completed", "failed"])),
                                              last_step=step), "current"))
        elif action == "preempt":
            entries.append(Entry(PreemptionSignalled(signal="SIGTERM", step=step), "current"))
            entries.append(Entry(AttemptEnded(epoch=epoch, reason="preempted", last_step=step), "current"))
    return entries


#: Plausible and implausible logs (and plausible ones with arbitrary events spliced in).
event_logs = st.one_of(
    plausible_log(),
    st.lists(arbitrary_entry(), max_size=30),
    st.tuples(plausible_log(max_actions=25), st.lists(arbitrary_entry(), max_size=8)).map(lambda t: t[0] + t[1]),
)
