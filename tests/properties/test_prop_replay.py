"""Replay determinism: every way of computing the projection gives the same state.

Full replay == snapshot + tail (encode/decode at every split point) == the incremental,
cached, snapshotting projection of real ``Ledger`` handles (two writers and a reader)
== ``projection(at=seq)`` at every seq.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Iterator

from event_strategies import Entry, append_one, as_stored, event_logs
from hypothesis import event, given
from hypothesis import strategies as st

import ledger.ledger
from ledger import Ledger
from ledger.events import StepCompleted
from ledger.projection import PROJECTION_VERSION, State, decode_state, encode_state, fold
from ledger.store import read_consistent


def same(a: State, b: State) -> bool:
    # Compare encoded bytes: equal for equal states, and NaN-safe.
    return encode_state(a) == encode_state(b)


@given(event_logs)
def test_snapshot_plus_tail_equals_full_replay_at_every_split(entries: list[Entry]):
    stored = as_stored(entries)
    full = fold(stored)
    assert same(fold(stored), full)  # deterministic
    for split in range(len(stored) + 1):
        prefix = fold(stored[:split])
        assert prefix.seq == (stored[split - 1].seq if split else 0)
        resumed = fold(stored[split:], decode_state(encode_state(prefix)))
        assert same(resumed, full), f"split at {split}"


@contextlib.contextmanager
def snapshot_every_cm(n: int) -> Iterator[None]:
    """Make writers snapshot every ``n`` folded events, so snapshots are written and used."""
    saved = ledger.ledger.SNAPSHOT_EVERY
    ledger.ledger.SNAPSHOT_EVERY = n
    try:
        yield
    finally:
        ledger.ledger.SNAPSHOT_EVERY = saved


@given(
    entries=event_logs,
    snapshot_every=st.integers(1, 4),
    schedule=st.lists(st.sampled_from(["append-a", "append-b", "project-a", "project-b", "project-ro", "reopen-a"]),
                      min_size=1, max_size=80),
)
def test_ledger_projection_paths_agree_with_full_replay(entries, snapshot_every, schedule):
    with snapshot_every_cm(snapshot_every), tempfile.TemporaryDirectory() as run_dir:
        a, b = Ledger.open(run_dir), Ledger.open(run_dir)  # two writer handles (e.g. trainer and `gc`)
        a.promote_aliases = b.promote_aliases = False  # the log must hold exactly the generated events
        try:
            todo, epoch = list(entries), 0
            for action in schedule + ["append-a"] * len(entries) + ["project-a", "project-b"]:
                if action.startswith("append") and todo:
                    entry = todo.pop(0)
                    append_one(a if action == "append-a" else b, entry, epoch)
                    epoch += entry.how == "begin"
                elif action.startswith("project"):
                    handle = {"project-a": a, "project-b": b}.get(action) or Ledger.open(run_dir, read_only=True)
                    assert same(handle.projection().state, a.full_replay()), action
                elif action == "reopen-a":
                    a.close()
                    a = Ledger.open(run_dir)
                    a.promote_aliases = False
            stored = a.events()
            assert [s.seq for s in stored] == list(range(1, len(entries) + 1))
            full = fold(stored)
            readers = [a, b, Ledger.open(run_dir), Ledger.open(run_dir, read_only=True)]
            for handle in readers:
                assert same(handle.projection().state, full)
            snapshots = read_consistent(a.store, lambda r: r.snapshot_count(projection_version=PROJECTION_VERSION))
            event(f"snapshots stored: {min(snapshots, 2)}")
            for at in range(len(stored) + 1):
                expected = fold(stored[:at])
                expected.seq = at
                for handle in (a, readers[-1]):
                    assert same(handle.projection(at=at).state, expected), f"at={at}"
            readers[2].close()
        finally:
            a.close()
            b.close()


def test_snapshots_are_written_and_used(tmp_path):
    # A fixed log long enough that both snapshot rows exist; a fresh handle must start from one and agree.
    with snapshot_every_cm(3), Ledger.open(tmp_path) as led:
        attempt = led.begin_attempt()
        for step in range(30):
            led.append(StepCompleted(step=step), epoch=attempt.epoch)
            if step % 5 == 4:
                led.projection()
        count, newest, oldest = read_consistent(led.store, lambda r: (
            r.snapshot_count(projection_version=PROJECTION_VERSION),
            r.snapshot_seq(at_most=10**9, projection_version=PROJECTION_VERSION),
            r.snapshot_seq(at_most=r.snapshot_seq(at_most=10**9, projection_version=PROJECTION_VERSION) - 1,
                           projection_version=PROJECTION_VERSION)))
        assert count == 2 and newest > 20
    fresh = Ledger.open(tmp_path)
    assert same(fresh.projection().state, fresh.full_replay())
    assert same(fresh.projection(at=oldest + 1).state, fresh.full_replay(at=oldest + 1))
