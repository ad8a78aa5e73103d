"""Retention never selects a protected checkpoint, for arbitrary states, policies and best rules.

Protected (defined here independently of ``decisions.protected``): latest and resume target
(on the newest attempt's branch), best, pinned, live in-flight (the newest attempt's, while it runs), and any user alias.
A checkpoint whose deletion was already requested is exempt: that decision is in the log
and its blobs may already be partly gone, so finishing it is the only safe move.
"""

from __future__ import annotations

from event_strategies import METRICS, as_stored, event_logs
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import BestRule, RetentionPolicy, decisions, retention
from ledger.events import CheckpointDeleted, CheckpointDeletionRequested
from ledger.projection import State, apply, decode_state, encode_state, fold

policies = st.builds(
    RetentionPolicy,
    keep_last=st.none() | st.integers(0, 4),
    keep_every=st.one_of(st.none(), st.none(), st.integers(1, 10)),
    keep_best=st.one_of(st.none(), st.none(), st.integers(0, 3)),
)

# These folds are pure and cheap: afford a few times the profile's examples.
many = settings(max_examples=4 * settings.default.max_examples)
rules = st.builds(BestRule, metric=st.sampled_from(METRICS), mode=st.sampled_from(["min", "max"]))


def branch_model(state: State) -> set[str] | None:
    """The newest attempt's checkpoints plus the one it resumed from and that one's parents (None: no attempt)."""
    if state.current_epoch not in state.attempts:
        return None
    members = {c.checkpoint_id for c in state.checkpoints.values() if c.epoch == state.current_epoch}
    cid = state.attempts[state.current_epoch].resumed_from
    walked: set[str] = set()
    while cid in state.checkpoints and cid not in walked:
        walked.add(cid)
        cid = state.checkpoints[cid].parent
    return members | walked


def must_keep(state: State, rule: BestRule) -> dict[str, str]:
    keep: dict[str, str] = {}
    for c in state.checkpoints.values():
        if c.deletion_requested:
            continue
        attempt = state.attempts.get(c.epoch)
        live = c.epoch == state.current_epoch and (attempt is None or attempt.status == "running")
        if c.status == "in_flight" and live:
            keep[c.checkpoint_id] = "live in flight"
        if c.pinned and c.status != "deleted":
            keep[c.checkpoint_id] = "pinned"
    for alias, cid in state.aliases.items():
        if alias not in ("latest", "best") and cid in state.checkpoints and not state.checkpoints[cid].deletion_requested:
            keep[cid] = f"alias {alias}"
    branch = branch_model(state)
    usable = [c for c in state.checkpoints.values() if c.status == "committed" and not c.deletion_requested
              and (branch is None or c.checkpoint_id in branch)]
    if usable:
        keep[max(usable, key=lambda c: (c.step, c.committed_seq)).checkpoint_id] = "resume"
        keep[max(usable, key=lambda c: c.committed_seq).checkpoint_id] = "latest"
    if (top := decisions.best(state, rule)) is not None:
        keep[top[0].checkpoint_id] = "best"
    return keep


@many
@given(event_logs, policies, rules)
def test_plan_never_selects_a_protected_checkpoint(entries, policy, rule):
    state = fold(as_stored(entries))
    plan = retention.plan(state, policy, rule)
    planned = [d.checkpoint_id for d in plan]
    assert len(planned) == len(set(planned)), "a checkpoint planned twice"
    keep = must_keep(state, rule)
    assert not {cid: keep[cid] for cid in planned if cid in keep}
    for d in plan:
        ckpt = state.checkpoints[d.checkpoint_id]
        assert not ckpt.deletion_done and d.reason
        assert d.locations == tuple(s.location for s in ckpt.shards)
    # Everything the ledger itself calls protected is also left alone.
    assert not set(planned) & {c for c in decisions.protected(state, rule) if not state.checkpoints[c].deletion_requested}

    # Carrying the plan out (as events) changes none of resume, latest, best.
    before = (decisions.resume_target(state), decisions.latest(state), decisions.best(state, rule))
    after_state = decode_state(encode_state(state))
    seq = state.seq
    for d in plan:
        for event in (CheckpointDeletionRequested(checkpoint_id=d.checkpoint_id, reason=d.reason),
                      CheckpointDeleted(checkpoint_id=d.checkpoint_id)):
            seq += 1
            apply(after_state, event, seq=seq, epoch=0, recorded_at=0.0)
    after = (decisions.resume_target(after_state), decisions.latest(after_state), decisions.best(after_state, rule))
    ids = lambda t: (t[0] and t[0].checkpoint_id, t[1] and t[1].checkpoint_id, t[2] and t[2][0].checkpoint_id)  # noqa: E731
    assert ids(after) == ids(before)
    # And a second plan has nothing left to finish.
    assert not [d for d in retention.plan(after_state, policy, rule) if d.checkpoint_id in planned]


@many
@given(event_logs, rules)
def test_inactive_policy_only_finishes_deletions_and_collects_failed_saves(entries, rule):
    state = fold(as_stored(entries))
    for d in retention.plan(state, RetentionPolicy(), rule):
        ckpt = state.checkpoints[d.checkpoint_id]
        assert ckpt.deletion_requested or decisions.is_torn(state, ckpt) or ckpt.status == "aborted"


@many
@given(event_logs, st.integers(0, 4), rules)
def test_keep_last_keeps_the_k_highest_steps_of_the_current_branch(entries, k, rule):
    state = fold(as_stored(entries))
    planned = {d.checkpoint_id for d in retention.plan(state, RetentionPolicy(keep_last=k), rule)}
    branch = branch_model(state)
    candidates = [c for c in state.checkpoints.values() if c.status in ("committed", "corrupt") and not c.deletion_requested
                  and (branch is None or c.checkpoint_id in branch)]
    top = sorted(candidates, key=lambda c: (c.step, c.committed_seq or 0), reverse=True)[:k]
    assert not planned & {c.checkpoint_id for c in top}
