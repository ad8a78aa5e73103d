"""The read model (ledger/read_model.py) answers exactly what a full replay answers, at every prefix.

Logs come from the same strategies as the replay properties (protocol-following and
arbitrary), appended one event at a time through two writer handles (like a trainer
and ``ckpt-ledger pin``), with handles abandoned mid-run (a crash: no close), zombie
appends refused by fencing, and writers opened with a stale read model. After every
append a fresh read-only handle must be answered by the read model, and agree with a
:class:`~ledger.view.View` of the pure fold of that prefix.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from event_strategies import Entry, append_one, event_logs
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import FencedError, Ledger
from ledger.events import StepCompleted
from ledger.health import view_facts
from ledger.projection import fold
from ledger.read_model import ReadModelView
from ledger.view import View


def check_prefix(run_dir: Path | str, stored_prefix: list) -> None:
    expected = fold(stored_prefix)
    expected.seq = len(stored_prefix)
    with Ledger.open(run_dir, read_only=True) as reader:  # closed: a PostgreSQL handle holds a connection
        view = reader.projection()
        assert isinstance(view, ReadModelView), "the read model fell behind the log"
        assert view_facts(view) == view_facts(View(expected)), f"at seq {len(stored_prefix)}"
        for cid in list(expected.checkpoints)[:2]:
            assert view.checkpoint(cid) == expected.checkpoints[cid]


_STRATEGIES = dict(
    entries=event_logs,
    schedule=st.lists(st.sampled_from(["a", "a", "a", "b", "crash-a", "zombie"]), min_size=1, max_size=60),
)


@settings(max_examples=15)  # each example opens a reader and folds the prefix after every append
@given(**_STRATEGIES)
def test_read_model_equals_full_replay_at_every_prefix(entries: list[Entry], schedule: list[str]):
    with tempfile.TemporaryDirectory() as tmp:
        check_schedule(Path(tmp) / "run", entries, schedule)


_pg_runs = iter(range(1, 10**9))


@settings(max_examples=8)  # a new connection per reader: fewer examples, same property
@given(**_STRATEGIES)
def test_read_model_equals_full_replay_at_every_prefix_on_postgres(pg_shared_database, entries: list[Entry],
                                                                   schedule: list[str]):
    check_schedule(f"{pg_shared_database}?run=prop-read-model-{next(_pg_runs)}", entries, schedule)


def check_schedule(run_dir, entries: list[Entry], schedule: list[str]) -> None:
    """Append ``entries`` to ``run_dir`` (a directory or a PostgreSQL run) as ``schedule`` says, checking each prefix."""
    a, b = Ledger.open(run_dir), Ledger.open(run_dir)
    a.promote_aliases = b.promote_aliases = False  # the log must hold exactly the generated events
    abandoned = []
    try:
        todo, epoch, appended = list(entries), 0, 0
        for action in schedule + ["a"] * len(entries):
            if not todo:
                break
            if action == "crash-a":
                abandoned.append(a)  # the process died holding it: never closed
                a = Ledger.open(run_dir)
                a.promote_aliases = False
                continue
            if action == "zombie":
                if epoch >= 2:
                    with pytest.raises(FencedError):
                        a.append(StepCompleted(step=1), epoch=epoch - 1)
                continue
            entry = todo.pop(0)
            append_one(a if action == "a" else b, entry, epoch)
            epoch += entry.how == "begin"
            appended += 1
            stored = a.events()
            assert len(stored) == appended
            check_prefix(run_dir, stored)  # StoredEvent carries what fold() needs
    finally:
        for handle in (a, b, *abandoned):
            handle.close()
