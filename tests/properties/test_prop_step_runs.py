"""The replay's step runs fold exactly like the per-event fold.

A replay reads ``step.completed`` rows without decoding them: SQLite parses the
step out of the stored text, numpy folds the steps (``ledger.store.queries.replay_parts``,
``ledger.projection._fold_step_run``). The definition stays the per-event fold of the
decoded events; these check the shortcut against it for any log, any window size
(so runs and chunks are cut at every place), steps that go back, steps too large for
the shortcut, steps of stale or operator epochs, and payloads the encoder would not write.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Iterator

import pytest
from event_strategies import Entry, append_all, event_logs
from hypothesis import given
from hypothesis import strategies as st

import ledger.store.queries as queries
from ledger import Ledger
from ledger.errors import CorruptLedgerError
from ledger.events import StepCompleted
from ledger.projection import encode_state, fold
from ledger.store import StepRun, raw, read_consistent


@contextlib.contextmanager
def replay_window(seqs: int) -> Iterator[None]:
    saved = queries.REPLAY_WINDOW
    queries.REPLAY_WINDOW = seqs
    try:
        yield
    finally:
        queries.REPLAY_WINDOW = saved


# Small steps (runs that rise, fall and repeat), steps around the shortcut's 10**12 limit, and huge ones.
any_step = st.one_of(st.integers(0, 40), st.integers(10**12 - 2, 10**12 + 2), st.integers(0, 2**50))
step_entries = st.builds(lambda step, how: Entry(StepCompleted(step=step, metrics={"loss": 0.5}), how),
                         any_step, st.sampled_from(["current", "current", "current", "operator"]))


@st.composite
def logs_with_step_runs(draw) -> list[Entry]:
    """A generated log with runs of step events spliced in at random places."""
    entries = list(draw(event_logs))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(entries)))
        entries[at:at] = draw(st.lists(step_entries, min_size=1, max_size=12))
    return entries


@given(entries=logs_with_step_runs(), window=st.integers(1, 9), cut=st.integers(0, 200))
def test_replay_with_step_runs_equals_the_per_event_fold(entries, window, cut):
    with tempfile.TemporaryDirectory() as run_dir, replay_window(window):
        with Ledger.open(run_dir) as led:
            led.promote_aliases = False  # the log must hold exactly the generated events
            append_all(led, entries)
        reader = Ledger.open(run_dir, read_only=True)
        stored = reader.events()
        for at in sorted({len(stored), min(cut, len(stored)), len(stored) // 2}):
            expected = fold(stored[:at])
            assert encode_state(reader.full_replay(at=at)) == encode_state(expected), f"at={at}, window={window}"


def _parts(run_dir) -> list:
    store = Ledger.open(run_dir, read_only=True).store
    return read_consistent(store, lambda r: list(r.replay_parts()))


def _trainer_like_log(run_dir, steps: int = 50) -> None:
    with Ledger.open(run_dir) as led:
        epoch = led.begin_attempt(world_size=1).epoch
        led.append_many([StepCompleted(step=s, metrics={"loss": 1 / s, "lr": 0.1}) for s in range(1, steps + 1)],
                        epoch=epoch)


def test_step_events_as_the_trainer_writes_them_take_the_shortcut(tmp_path):
    # If the encoder's framing of a step payload changes, replay must still be right (other tests)
    # but would silently lose its speed: this fails instead.
    _trainer_like_log(tmp_path)
    runs = [part for part in _parts(tmp_path) if isinstance(part, StepRun)]
    assert sum(len(run.steps) for run in runs) == 50
    assert [int(s) for run in runs for s in run.steps] == list(range(1, 51))


@pytest.mark.parametrize("payload", [
    '{"tag":"step.completed","metrics":{},"step":7}',  # fields in another order: valid, not framed
    '{"tag":"step.completed","step": 7,"metrics":{}}',  # a space before the digits
])
def test_valid_payloads_framed_otherwise_are_decoded(tmp_path, payload):
    _trainer_like_log(tmp_path)
    conn = raw.connect(tmp_path / "ledger.db")
    conn.execute("UPDATE events SET payload = ? WHERE seq = 20", (payload,))
    conn.commit()
    conn.close()
    led = Ledger.open(tmp_path, read_only=True)
    assert not any(isinstance(p, StepRun) for p in _parts(tmp_path)), "that window should have been decoded"
    replayed = led.full_replay()
    assert encode_state(replayed) == encode_state(fold(led.events()))
    # Seq 20 held step 19, now 7: the steps rise 0 -> 18, fall to 7, rise 7 -> 50 again.
    assert replayed.attempts[1].steps_run == 18 + (50 - 7)


@pytest.mark.parametrize("step_text", ["007", "7.0", "7e0", "-7", "+7", '"7"'])
def test_malformed_steps_are_refused_by_seq_not_misread(tmp_path, step_text):
    _trainer_like_log(tmp_path)
    conn = raw.connect(tmp_path / "ledger.db")
    conn.execute("UPDATE events SET payload = ? WHERE seq = 20",
                 ('{"tag":"step.completed","step":' + step_text + ',"metrics":{}}',))
    conn.commit()
    conn.close()
    led = Ledger.open(tmp_path, read_only=True)
    if step_text == "-7":  # valid JSON and a valid int: decoded, and folded like the decoder reads it
        assert encode_state(led.full_replay()) == encode_state(fold(led.events()))
        return
    with pytest.raises(CorruptLedgerError, match="seq 20"):
        led.full_replay()


def test_health_still_refuses_a_step_payload_damaged_past_its_step(tmp_path):
    # The replay does not parse a step event's metrics, so health (audit) decodes every payload itself.
    _trainer_like_log(tmp_path)
    conn = raw.connect(tmp_path / "ledger.db")
    conn.execute("UPDATE events SET payload = ? WHERE seq = 20",
                 ('{"tag":"step.completed","step":19,"metrics":{"loss":"x"}}',))
    conn.commit()
    conn.close()
    led = Ledger.open(tmp_path, read_only=True)
    led.full_replay()  # the step still reads as 19: the replay alone would not notice
    with pytest.raises(CorruptLedgerError, match="seq 20"):
        led.health()
