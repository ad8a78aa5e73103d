"""Lineage properties over generated trainer-like logs with explicit resumes (``--resume ID``) and fallbacks.

The generator folds as it goes (the pure projection, no SQLite) and keeps its own record of
every checkpoint's parent and every attempt's base, independent of the projection's. It writes
what a real trainer does: steps only go forward within an attempt, at most one save in flight,
an automatic restart resumes from the resume target (or falls back past corrupt ones, recording
``corruption.detected`` right after ``attempt.started``), an explicit one from any committed
checkpoint; plus late metrics, pins, aliases, corruption found later, and retention runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from event_strategies import FakeStored
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import RetentionPolicy, decisions, lineage, retention
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
    CorruptionDetected,
    Event,
    MetricRecorded,
    RunStarted,
    ShardWritten,
    StepCompleted,
)
from ledger.projection import State, apply

many = settings(max_examples=3 * settings.default.max_examples)


@dataclass
class GeneratedLog:
    """A generated log, the states after every event, and the generator's own lineage record."""

    stored: list[FakeStored] = field(default_factory=list)
    states: list[State] = field(default_factory=list)  # states[i]: after stored[i] (copied only when asked)
    parent: dict[str, str | None] = field(default_factory=dict)
    base: dict[int, str | None] = field(default_factory=dict)
    head: dict[int, str | None] = field(default_factory=dict)
    fallback_windows: set[int] = field(default_factory=set)  # seqs between attempt.started and its corruption reports
    explicit: int = 0


def _old_resume(state: State):
    """main's definition before lineage: the highest-step usable checkpoint anywhere."""
    usable = [c for c in state.checkpoints.values() if c.usable]
    return max(usable, key=lambda c: (c.step, c.committed_seq or 0), default=None)


def _old_latest(state: State):
    """main's definition before lineage: the most recently committed usable checkpoint anywhere."""
    return max((c for c in state.checkpoints.values() if c.usable), key=lambda c: c.committed_seq or 0, default=None)


def _ids(*ckpts) -> tuple:  # noqa: ANN002 - CheckpointState | None
    return tuple(c.checkpoint_id if c is not None else None for c in ckpts)


@st.composite
def trainer_logs(draw, explicit_resumes: bool = True, max_actions: int = 45) -> GeneratedLog:
    log = GeneratedLog()
    state = State()
    seq_box = [0]

    def emit(event: Event, epoch: int) -> int:
        seq_box[0] += 1
        seq = seq_box[0]
        apply(state, event, seq=seq, epoch=epoch, recorded_at=float(seq))
        log.stored.append(FakeStored(seq=seq, epoch=epoch, recorded_at=float(seq), event=event))
        log.states.append(_answers(state))
        return seq

    emit(RunStarted(run_id="r", config=draw(st.sampled_from([{}, {"best_metric": "acc", "best_mode": "max"}]))), 0)
    epoch, step, n, in_flight, ended = 0, 0, 0, None, False
    policies = st.builds(RetentionPolicy, keep_last=st.none() | st.integers(0, 3),
                         keep_every=st.none() | st.integers(5, 20), keep_best=st.none() | st.integers(0, 2))
    actions = draw(st.lists(st.sampled_from(
        ["attempt", "steps", "steps", "save", "save", "save", "begin", "finish", "metric", "pin", "alias",
         "corrupt", "retention", "end"]), min_size=5, max_size=max_actions))
    for action in actions:
        # A trainer writes nothing for an attempt after its attempt.ended: the next step or save is a new attempt's.
        if action == "attempt" or epoch == 0 or (ended and action in ("steps", "save", "begin", "finish")):
            candidates = decisions.resume_candidates(state)
            committed = [c for c in state.checkpoints.values() if c.usable]
            mode = draw(st.sampled_from(["auto", "auto", "fallback", "explicit"] if explicit_resumes
                                        else ["auto", "auto", "fallback"]))
            bad = []
            if mode == "explicit" and committed:
                target = draw(st.sampled_from(committed))
                log.explicit += target is not (candidates[0] if candidates else None)
            elif mode == "fallback" and len(candidates) > 1:
                k = draw(st.integers(1, len(candidates) - 1))
                bad, target = candidates[:k], candidates[k]
            else:
                target = candidates[0] if candidates else None
            epoch += 1
            resumed_from = target.checkpoint_id if target is not None else None
            started = emit(AttemptStarted(epoch=epoch, host="h", pid=1, resumed_from=resumed_from), epoch)
            for ckpt in bad:  # the trainer verifies first, records after attempt.started
                log.fallback_windows.add(seq_box[0])
                emit(CorruptionDetected(checkpoint_id=ckpt.checkpoint_id, location="x", expected_hash="xxh3:00"), epoch)
            assert started
            log.base[epoch] = log.head[epoch] = resumed_from
            step, in_flight, ended = (target.step if target is not None else 0), None, False
        elif action == "steps":
            step += draw(st.integers(1, 7))
            emit(StepCompleted(step=step, metrics={"loss": 1.0}), epoch)
        elif action in ("save", "begin") and in_flight is None:
            cid = f"k{n}"
            n += 1
            emit(CheckpointStarted(checkpoint_id=cid, step=step, ranks=[0]), epoch)
            log.parent[cid], log.head[epoch] = log.head[epoch], cid
            emit(ShardWritten(checkpoint_id=cid, rank=0, location=f"blobs/{cid}/e{epoch}/r0", bytes=1,
                              hash="xxh3:00"), epoch)
            if action == "save":
                emit(CheckpointCommitted(checkpoint_id=cid, step=step), epoch)
            else:
                in_flight = cid
        elif action == "finish" and in_flight is not None:
            if draw(st.booleans()):
                emit(CheckpointCommitted(checkpoint_id=in_flight, step=state.checkpoints[in_flight].step), epoch)
            else:
                emit(CheckpointAborted(checkpoint_id=in_flight, reason="rank died"), epoch)
                log.head[epoch] = log.parent[in_flight]
            in_flight = None
        elif action in ("metric", "pin", "alias", "corrupt") and state.checkpoints:
            cid = draw(st.sampled_from(sorted(state.checkpoints)))
            if action == "metric":
                emit(MetricRecorded(name=draw(st.sampled_from(["eval_loss", "acc"])), value=draw(st.floats(0, 10)),
                                    step=state.checkpoints[cid].step, checkpoint_id=cid), epoch)
            elif action == "pin":
                emit(CheckpointPinned(checkpoint_id=cid), 0)
            elif action == "alias":
                emit(AliasPromoted(alias="golden", checkpoint_id=cid), 0)
            elif state.checkpoints[cid].status == "committed":
                emit(CorruptionDetected(checkpoint_id=cid, location="y", expected_hash="xxh3:00"), 0)
        elif action == "retention":
            for deletion in retention.plan(state, draw(policies)):
                emit(CheckpointDeletionRequested(checkpoint_id=deletion.checkpoint_id, reason=deletion.reason), 0)
                emit(CheckpointDeleted(checkpoint_id=deletion.checkpoint_id), 0)
        elif action == "end" and not ended:
            emit(AttemptEnded(epoch=epoch, reason=draw(st.sampled_from(["completed", "preempted", "failed"])),
                              last_step=step), epoch)
            in_flight, ended = None, True  # an ended attempt's open save is torn
    log.final = state  # type: ignore[attr-defined]
    return log


def _answers(state: State) -> dict:
    """What each property looks at, computed on the state right after one event."""
    branch = lineage.current_branch(state)
    attempt = state.attempts.get(state.current_epoch)
    committed = [c for c in state.checkpoints.values() if c.status in ("committed", "corrupt") and not c.deletion_requested]
    return {
        "new": _ids(decisions.resume_target(state), decisions.latest(state)),
        "old": _ids(_old_resume(state), _old_latest(state)),
        "best": _ids(decisions.best(state)[0] if decisions.best(state) else None),
        "branch": branch,
        "head": attempt.head if attempt is not None else None,
        "chain": [c.checkpoint_id for c in lineage.ancestors(state, attempt.head)] if attempt is not None else None,
        "keep_last": {k: [c.checkpoint_id for c in sorted(
            (c for c in committed if branch is None or c.checkpoint_id in branch),
            key=lambda c: (c.step, c.committed_seq or 0), reverse=True)[:k]] for k in (1, 2, 3)},
        "planned_keep_last": {k: {d.checkpoint_id for d in retention.plan(state, RetentionPolicy(keep_last=k))}
                              for k in (1, 2, 3)},
        "steps": {cid: c.step for cid, c in state.checkpoints.items()},
    }


@many
@given(trainer_logs())
def test_resume_is_on_the_newest_attempts_branch_and_never_past_its_head(log: GeneratedLog):
    for stored, seen in zip(log.stored, log.states):
        resume, latest = seen["new"]
        if seen["branch"] is None:
            assert stored.seq < next((s.seq for s in log.stored if isinstance(s.event, AttemptStarted)), 10**9)
            continue
        if resume is not None:
            assert resume in seen["branch"], stored.seq
            assert resume in seen["chain"], (stored.seq, resume, seen["chain"])  # an ancestor of (or) the head
            assert seen["steps"][resume] <= seen["steps"][seen["head"]]
        # Steps only go forward within an attempt here, so the branch's head decides both.
        assert resume == latest, stored.seq


@many
@given(trainer_logs())
def test_parents_are_the_attempts_previous_checkpoint_or_its_base(log: GeneratedLog):
    state = log.final  # type: ignore[attr-defined]
    assert {cid: c.parent for cid, c in state.checkpoints.items()} == log.parent
    for epoch, attempt in state.attempts.items():
        assert attempt.resumed_from == log.base[epoch]
        assert attempt.head == log.head[epoch]


@many
@given(trainer_logs())
def test_retention_never_deletes_what_keep_last_keeps_on_the_current_branch(log: GeneratedLog):
    for stored, seen in zip(log.stored, log.states):
        for k in (1, 2, 3):
            assert not seen["planned_keep_last"][k] & set(seen["keep_last"][k]), (stored.seq, k)
            assert seen["new"][0] not in seen["planned_keep_last"][k]


@many
@given(trainer_logs(explicit_resumes=False))
def test_without_explicit_resumes_answers_are_as_before_lineage(log: GeneratedLog):
    """No --resume: every seq outside a corruption-fallback window gives main's old resume/latest."""
    for stored, seen in zip(log.stored, log.states):
        if stored.seq not in log.fallback_windows:
            assert seen["new"] == seen["old"], stored.seq
