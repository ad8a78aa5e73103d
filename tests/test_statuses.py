"""Statuses are ``str`` enums that change no persisted or printed byte.

The spellings are public (the log, ``inspect --json``, ``audit --json``, snapshots, the
read model): each member must equal its old string everywhere it can surface, and the
outputs of the committed fixture ledgers must match what main printed before the enums
(``tests/public_outputs.py``, goldens written at 47d8370).
"""

from __future__ import annotations

import json

import msgspec
import pytest

import ledger
from ledger import AnomalyKind, AttemptStatus, CheckpointStatus, Ledger, Severity
from ledger.events import ATTEMPT_END_REASONS, AttemptEnded, CheckpointAborted
from ledger.events.codec import encode as encode_event
from ledger.projection import decode_state, encode_state, fold
from ledger.read_model import full_rows
from public_outputs import FIXTURES, GOLDEN, public_outputs
from runs import build_crashed_run, build_healthy_run

#: The public spellings, as the contract lists them.
CONTRACT_SPELLINGS = {
    CheckpointStatus: {"committed", "in_flight", "aborted", "deleted", "corrupt"},
    AttemptStatus: {"running", "completed", "preempted", "failed", "fenced", "crashed"},
    AnomalyKind: {"integrity", "seq_gap", "fencing", "trailing_garbage", "creation_leftover", "snapshot_mismatch",
                  "read_model_mismatch", "protocol"},
    Severity: {"problem", "note"},
}
ALL_MEMBERS = [member for enum_type in CONTRACT_SPELLINGS for member in enum_type]


@pytest.mark.parametrize("enum_type", list(CONTRACT_SPELLINGS), ids=lambda t: t.__name__)
def test_each_enum_has_exactly_the_public_spellings(enum_type):
    assert {m.value for m in enum_type} == CONTRACT_SPELLINGS[enum_type]
    assert all(m.name.lower() == m.value for m in enum_type)  # a member reads as what it prints


def test_attempt_end_reasons_are_unchanged():
    assert ATTEMPT_END_REASONS == ("completed", "preempted", "failed", "fenced", "crashed")
    assert all(type(r) is str for r in ATTEMPT_END_REASONS)


@pytest.mark.parametrize("member", ALL_MEMBERS, ids=str)
def test_a_member_is_its_string_in_every_form(member):
    value = member.value
    assert member == value and value == member and hash(member) == hash(value)
    assert {value: 1}[member] == 1 and member in (value,) and value in {member}
    assert str(member) == value and f"{member}" == value and f"{member:>12}" == f"{value:>12}"
    assert "%s" % member == value and member + "!" == value + "!"
    assert json.dumps({"s": member}) == json.dumps({"s": value})
    assert msgspec.json.encode(member) == msgspec.json.encode(value)
    assert msgspec.msgpack.encode(member) == msgspec.msgpack.encode(value)
    assert type(str(member)) is str  # what a database driver receives when the code converts


def test_the_enums_are_exported_from_ledger():
    for name in ("CheckpointStatus", "AttemptStatus", "AnomalyKind", "Severity"):
        assert name in ledger.__all__ and getattr(ledger, name).__module__ == "ledger.statuses"


def test_events_with_enum_reasons_encode_as_the_plain_strings():
    for event, plain in [
        (AttemptEnded(epoch=3, reason=AttemptStatus.PREEMPTED, last_step=7),
         AttemptEnded(epoch=3, reason="preempted", last_step=7)),
        (AttemptEnded(epoch=2, reason=AttemptStatus.FENCED, last_step=None, fenced_by=3),
         AttemptEnded(epoch=2, reason="fenced", last_step=None, fenced_by=3)),
        (CheckpointAborted(checkpoint_id="step000010-e1", reason=CheckpointStatus.ABORTED),
         CheckpointAborted(checkpoint_id="step000010-e1", reason="aborted")),
    ]:
        assert encode_event(event) == encode_event(plain)


def _with_plain_strings(state):
    """A copy of ``state`` whose statuses are plain ``str`` (what the code stored before the enums)."""
    copy = decode_state(encode_state(state))
    for ckpt in copy.checkpoints.values():
        ckpt.status = str(ckpt.status)
    for attempt in copy.attempts.values():
        attempt.status = str(attempt.status)
    return copy


@pytest.mark.parametrize("build", [build_healthy_run, build_crashed_run])
def test_the_fold_holds_enum_members_and_encodes_as_before(tmp_path, build):
    info = build(tmp_path / "run")
    with Ledger.open(info.run_dir, read_only=True) as led:
        state = fold(led.events())
    statuses = {c.status for c in state.checkpoints.values()}
    assert statuses and all(type(s) is CheckpointStatus for s in statuses)
    assert {a.status for a in state.attempts.values()} <= set(AttemptStatus)
    plain = _with_plain_strings(state)
    assert all(type(c.status) is str for c in plain.checkpoints.values())
    assert encode_state(state) == encode_state(plain)  # snapshot bytes
    rows, plain_rows = full_rows(state), full_rows(plain)
    assert rows == plain_rows  # read-model rows (the status column and the encoded rows)
    assert all(type(row.status) is str for row in rows.checkpoints.values())
    # A decoded snapshot types checkpoint statuses again: readers compare members, not spellings.
    assert all(type(c.status) is CheckpointStatus for c in decode_state(encode_state(plain)).checkpoints.values())


def test_the_fold_records_every_checkpoint_status(tmp_path):
    info = build_crashed_run(tmp_path / "run")
    with Ledger.open(info.run_dir, read_only=True) as led:
        view = led.projection()
        by_id = view.checkpoints
    assert by_id[info.committed[0]].status is CheckpointStatus.COMMITTED
    assert by_id[info.aborted[0]].status is CheckpointStatus.ABORTED
    assert by_id[info.torn[0]].status is CheckpointStatus.IN_FLIGHT
    assert [a.status for a in view.attempts] == [AttemptStatus.CRASHED, AttemptStatus.COMPLETED]


@pytest.mark.parametrize("name", ["linear", "branched"])
def test_public_outputs_of_fixture_ledgers_are_byte_identical_to_main_before_enums(name):
    expected = json.loads((FIXTURES / name / GOLDEN).read_text())
    found = public_outputs(FIXTURES / name)
    assert found.keys() == expected.keys()
    for key in expected:  # one at a time, so a failure names the output that changed
        assert found[key] == expected[key], key
    assert '"status": "committed"' in found["inspect_json"] and '"severity": "problem"' in found["audit_json"]
