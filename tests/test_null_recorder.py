"""``trainer.recorder``: rank 0 records through a ``RunRecorder``, every other rank holds a ``NullRecorder``.

The null recorder's answers must let rank 0 decide alone (it allows every checkpoint and
never reports fencing) and it must never touch a ledger; a real two-rank loop checks that
rank 1 opens no ledger, that the log holds each fact once, and that fencing still reaches
rank 1 through rank 0.
"""

from __future__ import annotations

import inspect
import json
import typing

import pytest

from distributed_ranks import run_ranks
from ledger import Ledger, RetentionPolicy
from trainer.recorder import NullRecorder, Recorder
from trainer.run_recorder import RunRecorder, ShardFact

RANK_TIMEOUT = 180.0

#: The protocol's methods (its one attribute, ``fenced_by``, is checked on its own).
PROTOCOL_METHODS = sorted(name for name, value in vars(Recorder).items()
                          if callable(value) and not name.startswith("_"))


def test_the_protocol_names_every_call_the_checkpoint_code_makes():
    assert PROTOCOL_METHODS == sorted([
        "abort_checkpoint", "apply_retention", "begin_attempt", "begin_checkpoint", "close", "end_attempt",
        "flush_steps", "metric", "record_and_commit", "report_corruption", "step_completed"])
    assert "fenced_by" in typing.get_type_hints(Recorder)


@pytest.mark.parametrize("name", PROTOCOL_METHODS)
def test_both_recorders_take_the_protocols_arguments(name):
    wanted = inspect.signature(getattr(Recorder, name))
    for cls in (RunRecorder, NullRecorder):
        found = inspect.signature(getattr(cls, name))
        assert [(p.name, p.kind) for p in found.parameters.values()] == \
            [(p.name, p.kind) for p in wanted.parameters.values()], f"{cls.__name__}.{name}{found}"


def test_both_recorders_are_recorders(tmp_path):
    writer = RunRecorder(str(tmp_path))
    try:
        assert isinstance(writer, Recorder) and isinstance(NullRecorder(), Recorder)
    finally:
        writer.close()


def test_the_null_recorders_answers_leave_every_decision_to_rank_0(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything it wrote would land here
    null = NullRecorder()
    assert null.fenced_by is None
    assert null.begin_checkpoint("step000002-e1", 2, 2, "ddp", {"dp": 2}) is True  # no veto: rank 0 says
    assert null.fenced_by is None
    assert null.begin_attempt(world_size=2, stack="ddp", topology={"dp": 2}, resumed_from=None, slurm=None,
                              previous_topology=None) is None  # the epoch comes from rank 0's broadcast
    assert null.apply_retention(RetentionPolicy(keep_last=1)) == []
    for call in (lambda: null.step_completed(1, {"loss": 1.0}), null.flush_steps,
                 lambda: null.metric("eval_loss", 0.5, 2, "step000002-e1"),
                 lambda: null.report_corruption("step000002-e1", "blobs/x", "sha256:00", None),
                 lambda: null.abort_checkpoint("step000002-e1", "a rank failed"),
                 lambda: null.end_attempt("completed", 2), null.close):
        assert call() is None
    assert null.fenced_by is None
    assert list(tmp_path.iterdir()) == []
    assert not hasattr(null, "ledger")


def test_the_null_recorder_refuses_to_commit():
    shard = ShardFact(rank=1, location="blobs/step000002-e1/e1/__1_0.distcp", bytes=8, hash="sha256:00")
    with pytest.raises(RuntimeError, match="only rank 0 commits"):
        NullRecorder().record_and_commit("step000002-e1", [shard])


def _two_ranks(tmp_path, *extra: str) -> tuple[list[dict], Ledger]:
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    result = run_ranks("null_recorder_rank.py", ["--run-dir", str(run_dir), "--out", str(out), *extra], 2,
                       timeout=RANK_TIMEOUT, log_dir=tmp_path / "logs")
    assert result.returncodes == [0, 0], result.describe()
    opened = sorted(p.name for p in out.glob("*.opened_ledger"))
    assert opened == [], (out / opened[0]).read_text()[-3000:]  # rank 1 opened a ledger: it must not
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, Ledger.open(run_dir, read_only=True)


def _tags(led: Ledger) -> list[str]:
    return [stored.tag for stored in led.events()]


@pytest.mark.multiprocess
def test_rank_1_records_nothing_and_each_fact_is_in_the_log_once(tmp_path):
    (rank0, rank1), led = _two_ranks(tmp_path, "--steps", "6")
    with led:
        tags = _tags(led)
        view = led.projection()
    assert rank0["recorder_in_loop"] == "RunRecorder" and rank1["recorder_in_loop"] == "NullRecorder"
    assert rank0["recorder_after_close"] == rank1["recorder_after_close"] == "NullRecorder"
    for rank in (rank0, rank1):  # the same decisions on both ranks: rank 1's null answers changed nothing
        assert rank["saves"] == ["committed"] * 3 and (rank["status"], rank["exit_code"]) == ("completed", 0)
    assert tags.count("run.started") == tags.count("attempt.started") == tags.count("attempt.ended") == 1
    assert tags.count("step.completed") == 6
    assert tags.count("checkpoint.started") == tags.count("checkpoint.committed") == 3
    assert tags.count("metric.recorded") == 3
    assert tags.count("shard.written") == len({s.location for c in view.checkpoints.values() for s in c.shards})
    assert {s.rank for s in view.resume.shards} == {0, 1}  # rank 1 wrote its shards; rank 0 recorded them
    [attempt] = view.attempts
    assert attempt.status == "completed" and attempt.pid == rank0["pid"] and attempt.world_size == 2


@pytest.mark.multiprocess
def test_fencing_reaches_rank_1_through_rank_0(tmp_path):
    (rank0, rank1), led = _two_ranks(tmp_path, "--steps", "6", "--fence-at", "3")
    with led:
        tags = _tags(led)
        view = led.projection()
    for rank in (rank0, rank1):
        assert rank["saves"] == ["committed", "fenced"], rank
        assert (rank["status"], rank["exit_code"]) == ("fenced", 1)
    assert tags.count("checkpoint.started") == tags.count("checkpoint.committed") == 1
    first, newer = view.attempts
    assert (first.status, first.fenced_by) == ("fenced", newer.epoch)
