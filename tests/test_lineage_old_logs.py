"""Ledgers written by main before lineage (tests/fixtures/old_ledgers, made by bf206c9 with
tests/fixtures/make_old_ledgers.sh) project to the same resume/latest/best at every sequence
number where no branching happened, and a branched one now follows its newest attempt's branch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ledger import Ledger

FIXTURES = Path(__file__).parent / "fixtures" / "old_ledgers"


def _open_copy(name: str, tmp_path: Path) -> Ledger:
    shutil.copy(FIXTURES / name / "ledger.db", tmp_path / "ledger.db")  # read-only opens never write, but be safe
    return Ledger.open(tmp_path, read_only=True)


def _expected(name: str) -> dict:
    return json.loads((FIXTURES / name / "expected_by_main_bf206c9.json").read_text())


def _answers(led: Ledger, seq: int) -> list:
    view = led.projection(at=seq)
    return [seq, view.resume and view.resume.checkpoint_id, view.latest and view.latest.checkpoint_id,
            view.best and view.best.checkpoint_id]


def _attempt_starts(led: Ledger) -> list[tuple[int, str | None]]:
    return [(s.seq, s.event.resumed_from) for s in led.events(tags=["attempt.started"])]


def test_linear_old_ledger_projects_as_before_at_every_seq(tmp_path):
    expected = _expected("linear")["by_seq"]
    with _open_copy("linear", tmp_path) as led:
        # The one moment the answers may differ: attempt 4 found the old resume target's shard
        # corrupt while starting, so it resumed one checkpoint back (a branch point) and recorded
        # corruption.detected right after attempt.started. Between the two events the new
        # projection already follows attempt 4's branch; from the corruption on, both agree.
        corrupt = {s.event.checkpoint_id: s.seq for s in led.events(tags=["corruption.detected"])}
        assert len(corrupt) == 1
        window = {seq for seq, _ in _attempt_starts(led) if seq + 1 in corrupt.values()}
        assert len(window) == 1
        differing = [row[0] for row in expected if _answers(led, row[0]) != row]
        assert differing == sorted(window)
        seq = differing[0]
        assert _answers(led, seq)[1] == dict(_attempt_starts(led))[seq]  # resume = what attempt 4 loaded
        view = led.projection()
        assert all(c["on_current_branch"] or c["status"] != "committed" for c in view.to_dict()["checkpoints"])


def test_branched_old_ledger_resumes_on_the_newest_attempts_branch(tmp_path):
    data = _expected("branched")
    with _open_copy("branched", tmp_path) as led:
        (_, first), (branched_at, resumed_from) = _attempt_starts(led)
        assert (first, resumed_from) == (None, "step000030-e1")
        for row in data["by_seq"][:branched_at]:
            assert _answers(led, row[0]) == row
        # main said resume = step000060-e1 (the abandoned branch): that was the bug.
        assert data["resume"]["checkpoint_id"] == "step000060-e1"
        view = led.projection()
        assert (view.resume.checkpoint_id, view.latest.checkpoint_id) == ("step000045-e2", "step000045-e2")
        assert view.best.checkpoint_id == data["best"]["checkpoint_id"] == "step000060-e1"  # best stays global
        # Right after the explicit --resume (before attempt 2 committed anything) the branch is at 30.
        then = led.projection(at=branched_at)
        assert (then.resume.checkpoint_id, then.latest.checkpoint_id) == ("step000030-e1", "step000030-e1")
        by_id = {c["checkpoint_id"]: c for c in view.to_dict()["checkpoints"]}
        assert by_id["step000040-e2"]["parent"] == "step000030-e1"
        assert by_id["step000040-e1"]["parent"] == "step000030-e1"
        assert by_id["step000010-e1"]["parent"] is None
        assert [c for c, d in by_id.items() if not d["on_current_branch"]] == [
            "step000040-e1", "step000050-e1", "step000060-e1"]


@pytest.mark.parametrize("name", ["linear", "branched"])
def test_old_ledgers_read_read_only_and_leave_the_file_untouched(name, tmp_path):
    with _open_copy(name, tmp_path) as led:
        led.projection()
    assert (tmp_path / "ledger.db").read_bytes() == (FIXTURES / name / "ledger.db").read_bytes()
