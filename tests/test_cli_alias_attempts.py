"""alias / unalias, alias history (writer-side alias.promoted), end-attempt, and the next attempt's
retention pass collecting what fenced or dead attempts left behind."""

from __future__ import annotations

import json
import time

import pytest
from runs import build_crashed_run, build_healthy_run, cid_for, run_main, save_checkpoint, start, train_steps

from ledger import Ledger, RetentionPolicy
from ledger.events import AttemptEnded, MetricRecorded
from ledger.garbage import retention_pass


def _json(capsys, *argv: str) -> dict:
    code, out, err = run_main(list(argv), capsys)
    assert code == 0, err
    return json.loads(out)


def test_alias_points_protects_moves_and_unalias_removes(tmp_path, capsys):
    info = build_healthy_run(tmp_path / "run")
    run = str(info.run_dir)
    first, second = info.committed[0], info.committed[1]
    code, out, _ = run_main(["alias", run, "golden", first], capsys)
    assert code == 0 and f"golden -> {first}" in out
    aliased_at = Ledger.open(run, read_only=True).max_seq()
    shown = _json(capsys, "inspect", run, "--json")
    assert shown["aliases"]["golden"] == first
    gc = _json(capsys, "gc", run, "--dry-run", "--keep-last", "1", "--json")
    assert first not in {c["checkpoint_id"] for c in gc["checkpoints"]}  # aliased: kept
    assert second in {c["checkpoint_id"] for c in gc["checkpoints"]}
    code, out, _ = run_main(["alias", run, "golden", second], capsys)
    assert code == 0 and f"(was {first})" in out
    # Time travel shows what every alias pointed to then.
    assert _json(capsys, "inspect", run, "--json", "--at", str(aliased_at))["aliases"]["golden"] == first
    code, out, _ = run_main(["inspect", run, "--at", str(aliased_at)], capsys)
    assert f"golden -> {first}" in out
    history = [json.loads(x) for x in run_main(["replay", run, "--json", "--kind", "alias.promoted"], capsys)[1].splitlines()]
    assert [(h["alias"], h["checkpoint_id"]) for h in history if h["alias"] == "golden"] == [
        ("golden", first), ("golden", second)]
    code, out, _ = run_main(["unalias", run, "golden"], capsys)
    assert code == 0 and f"was {second}" in out
    assert "golden" not in _json(capsys, "inspect", run, "--json")["aliases"]
    assert [json.loads(x)["alias"] for x in run_main(["replay", run, "--json", "--kind", "alias.removed"], capsys)[1].splitlines()] == ["golden"]


@pytest.mark.parametrize("argv, code, words", [
    (["alias", "{run}", "latest", "{cid}"], 2, "kept by the ledger"),
    (["alias", "{run}", "9lives", "{cid}"], 2, "not a valid name"),
    (["alias", "{run}", "{cid}", "{cid}"], 2, "also a checkpoint id"),
    (["alias", "{run}", "golden", "nope"], 1, "no checkpoint 'nope'"),
    (["alias", "{run}", "golden", "{aborted}"], 1, "is aborted"),
    (["unalias", "{run}", "golden"], 1, "no alias 'golden'"),
    (["unalias", "{run}", "best"], 2, "kept by the ledger"),
])
def test_bad_alias_requests_are_refused_and_change_nothing(tmp_path, capsys, snapshot_files, argv, code, words):
    info = build_crashed_run(tmp_path / "run")
    fill = {"run": str(info.run_dir), "cid": info.committed[0], "aborted": info.aborted[0]}
    before = snapshot_files(info.run_dir)
    got, out, err = run_main([a.format(**fill) for a in argv], capsys)
    assert got == code and words in err and len(err.strip().splitlines()) == 1, err
    assert snapshot_files(info.run_dir) == before


def test_export_accepts_a_user_alias(tmp_path, capsys):
    pytest.importorskip("torch")
    from trainer_support import QUICK, run_cli

    run = str(tmp_path / "run")
    assert run_cli("train", "--run-dir", run, *QUICK, "--sync-checkpoint").returncode == 0
    assert run_main(["alias", run, "release-1", "step000010-e1"], capsys)[0] == 0
    code, out, err = run_main(["export", run, "--checkpoint", "release-1", "--out", str(tmp_path / "m.pt")], capsys)
    assert code == 0 and "exported step000010-e1" in out, err
    code, _, err = run_main(["export", run, "--checkpoint", "no-such-alias", "--out", str(tmp_path / "x.pt")], capsys)
    assert code == 1 and "no checkpoint 'no-such-alias'" in err


def test_writer_records_latest_and_best_moves_as_alias_history(run_dir):
    with Ledger.open(run_dir) as led:
        led.start_run(run_id="r", config={})
        a = led.begin_attempt().epoch
        save_checkpoint(led, a, 10)
        save_checkpoint(led, a, 20)
        led.record_metric("eval_loss", 2.0, 20, cid_for(20, a), epoch=a)
        led.record_metric("eval_loss", 1.0, 10, cid_for(10, a), epoch=a)  # a late, better eval: best moves back
        b = led.begin_attempt(resumed_from=cid_for(10, a)).epoch  # an explicit resume: latest moves back
        history = [(s.event.alias, s.event.checkpoint_id) for s in led.events(tags=["alias.promoted"])]
        assert history == [("latest", cid_for(10, a)), ("latest", cid_for(20, a)), ("best", cid_for(20, a)),
                           ("best", cid_for(10, a)), ("latest", cid_for(10, a))]
        assert all(s.epoch in (a, b) for s in led.events(tags=["alias.promoted"]))
        before = led.max_seq()
        led.append(MetricRecorded(name="loss", value=1.0, step=10), epoch=b)  # not a best metric: nothing moves
        led.projection()
        assert led.max_seq() == before + 1


def test_end_attempt_lets_gc_remove_the_in_flight_save(tmp_path, capsys):
    info = build_crashed_run(tmp_path / "run", restart=False)
    run = str(info.run_dir)
    torn = info.torn[0]
    # The newest attempt appended just now: it may be alive, so it is refused.
    code, _, err = run_main(["end-attempt", run, "1", "--reason", "crashed"], capsys)
    assert code == 1 and "may still be running" in err
    gc = _json(capsys, "gc", run, "--dry-run", "--json")
    assert torn not in {c["checkpoint_id"] for c in gc["checkpoints"]}
    code, out, err = run_main(["end-attempt", run, "1", "--reason", "crashed", "--grace", "0"], capsys)
    assert code == 0 and "recorded as crashed" in out, err
    shown = _json(capsys, "inspect", run, "--json")
    assert shown["attempts"][0]["status"] == "crashed"
    code, out, err = run_main(["gc", run, "--json"], capsys)
    assert code == 0 and torn in {c["checkpoint_id"] for c in json.loads(out)["checkpoints"]}
    assert not any(p.exists() for p in info.stray_files)
    code, out, _ = run_main(["audit", run], capsys)
    assert code == 0, out
    assert run_main(["end-attempt", run, "1", "--reason", "crashed"], capsys)[0] == 1  # already ended
    code, _, err = run_main(["end-attempt", run, "7", "--reason", "crashed"], capsys)
    assert code == 1 and "no attempt 7" in err


def test_next_attempts_retention_pass_collects_a_fenced_attempts_leftovers(run_dir):
    led = start(run_dir)
    old = led.begin_attempt(world_size=2, stack="ddp").epoch
    train_steps(led, old, 1, 10)
    save_checkpoint(led, old, 10)
    save_checkpoint(led, old, 20, commit=False)  # in flight when the next attempt fences it
    stray = led.blobs.path(f"{led.blobs.checkpoint_dir('step000030-e1', old)}/__0_0.distcp")
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"written after the fence, never recorded")
    new = led.begin_attempt(world_size=2, stack="ddp", resumed_from=cid_for(10, old)).epoch
    # The fenced job records what happened to it, as an operator write (its own epoch is refused).
    led.append(AttemptEnded(epoch=old, reason="fenced", last_step=20, fenced_by=new), epoch=None)
    own = led.blobs.path(f"{led.blobs.checkpoint_dir('step000040-e2', new)}/.x.tmp")
    own.parent.mkdir(parents=True)
    own.write_bytes(b"this attempt's own file: never touched by its pass")
    save_checkpoint(led, new, 30)
    done = retention_pass(led, RetentionPolicy(), epoch=new)
    assert [d.checkpoint_id for d in done.deletions] == [cid_for(20, old)]
    assert [s.location for s in done.removed] == ["blobs/step000030-e1/e1/__0_0.distcp"]
    assert not stray.exists() and own.exists()
    view = led.projection()
    attempt = view.attempts[0]
    assert (attempt.status, attempt.fenced_by) == ("fenced", new)
    led.close()
    from ledger.audit import audit

    own.unlink()
    report = audit(Ledger.open(run_dir, read_only=True), process_alive=lambda host, pid: True)
    assert report.healthy, [f.message for f in report.problems]
    assert any(f.kind == "fenced_attempt" and f"fenced by epoch {new}" in f.message for f in report.notes)


def test_a_fenced_recorder_records_attempt_ended_fenced(run_dir):
    from trainer.run_recorder import RunRecorder

    recorder = RunRecorder(str(run_dir))
    recorder.start_run({}, "h", None)
    recorder.begin_attempt(world_size=1, stack="ddp", topology={}, resumed_from=None, slurm=None,
                          previous_topology=None)
    recorder.step_completed(3, {"loss": 1.0})
    recorder.flush_steps()
    with Ledger.open(run_dir) as other:
        newer = other.begin_attempt().epoch
    recorder.step_completed(4, {"loss": 1.0})
    recorder.flush_steps()  # refused: fenced
    recorder.close()
    view = Ledger.open(run_dir, read_only=True).projection()
    first = view.attempts[0]
    assert (first.status, first.fenced_by, first.last_step) == ("fenced", newer, 4)
    assert recorder.fenced_by == newer
    time.sleep(0)  # (no clock involved: status comes from the log)
