"""A stateful recovery machine over the real SQLite store and blob store, checked against a plain model.

Rules start attempts (kept in a Bundle, so stale ones come back as zombies), run the
two-phase checkpoint protocol, record (late) metrics, pin, alias, run retention, corrupt
shards and "load" the resume target the way a restart does, and crash: abandoning the
``Ledger`` handle without closing it, optionally at a named crash point in the middle of
a shard write, a commit or a retention run. After every step the invariants compare the
ledger with :class:`Model` (the truth, kept in plain dicts).

Injected crashes are counted in ``tests/properties/.counts/crashes.json`` (and printed with ``-s``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import event, note
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

import ledger.blobs
import ledger.ledger
import ledger.retention
from ledger import CorruptBlobError, FencedError, IncompleteCheckpointError, Ledger, RetentionPolicy
from ledger.events import AliasPromoted, CheckpointPinned, CheckpointUnpinned, MetricRecorded, ShardWritten, StepCompleted
from ledger.health import view_facts
from ledger.projection import encode_state
from ledger.read_model import ReadModelView
from ledger.view import View

COUNTS = Path(__file__).parent / ".counts" / "crashes.json"
TOTALS = {"crashes": 0, "examples": 0, "zombie_refusals": 0, "incomplete_commits_refused": 0, "corruptions_reported": 0}


class SimulatedCrash(BaseException):
    """The process 'dies' at a crash point (BaseException: nothing in the ledger may catch it)."""


@dataclass
class Ckpt:
    """What the model knows about one checkpoint."""

    cid: str
    step: int
    epoch: int
    ranks: list[int]
    shards: dict[str, int] = field(default_factory=dict)  # location -> rank
    status: str = "in_flight"
    commit_seq: int = 0
    deletion_requested: bool = False  # status turns "deleted" at the request: never loaded again
    deletion_done: bool = False  # checkpoint.deleted: every blob is gone
    pinned: bool = False
    metric: float | None = None
    corrupted: set[str] = field(default_factory=set)
    parent: str | None = None

    @property
    def usable(self) -> bool:
        return self.status == "committed" and not self.deletion_requested

    @property
    def missing_ranks(self) -> set[int]:
        return set(self.ranks) - set(self.shards.values())


@dataclass
class Model:
    """The truth, as plain data: no SQLite, no projection code."""

    epoch: int = 0
    ended: set[int] = field(default_factory=set)
    ckpts: dict[str, Ckpt] = field(default_factory=dict)
    metrics_by_step: dict[int, float] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    base: dict[int, str | None] = field(default_factory=dict)  # epoch -> the checkpoint it resumed from
    head: dict[int, str | None] = field(default_factory=dict)  # epoch -> its newest checkpoint not aborted

    def branch(self) -> set[str]:
        """The newest attempt's checkpoints, the one it resumed from and that one's parents."""
        members = {c.cid for c in self.ckpts.values() if c.epoch == self.epoch}
        cid = self.base.get(self.epoch)
        while cid is not None:
            members.add(cid)
            cid = self.ckpts[cid].parent
        return members

    def usable(self) -> list[Ckpt]:
        branch = self.branch()
        return [c for c in self.ckpts.values() if c.usable and c.cid in branch]

    def usable_anywhere(self) -> list[Ckpt]:
        return [c for c in self.ckpts.values() if c.usable]

    def resume(self) -> str | None:
        return max(self.usable(), key=lambda c: (c.step, c.commit_seq), default=Ckpt("", 0, 0, [])).cid or None

    def latest(self) -> str | None:
        return max(self.usable(), key=lambda c: c.commit_seq, default=Ckpt("", 0, 0, [])).cid or None

    def best(self) -> str | None:
        scored = []
        for c in self.usable_anywhere():  # best is not limited to the current branch
            value = c.metric if c.metric is not None else self.metrics_by_step.get(c.step)
            if value is not None:
                scored.append((value, -c.step, -c.commit_seq, c.cid))
        return min(scored)[-1] if scored else None

    def live(self, c: Ckpt) -> bool:
        return c.status == "in_flight" and c.epoch == self.epoch and c.epoch not in self.ended

    def protected(self) -> set[str]:
        keep = {cid for cid in (self.resume(), self.latest(), self.best()) if cid}
        for c in self.ckpts.values():
            if not c.deletion_requested and (self.live(c) or (c.pinned and c.status != "deleted")):
                keep.add(c.cid)
        keep |= {cid for cid in self.aliases.values() if not self.ckpts[cid].deletion_requested}
        return keep

    def in_flight(self) -> list[Ckpt]:
        return [c for c in self.ckpts.values() if c.status == "in_flight" and not c.deletion_requested]

    def delete_requested(self, cid: str) -> None:
        self.ckpts[cid].deletion_requested = True
        self.ckpts[cid].status = "deleted"

    def deleted(self, cid: str) -> None:
        self.ckpts[cid].deletion_requested = self.ckpts[cid].deletion_done = True
        self.ckpts[cid].status = "deleted"
        self.aliases = {a: c for a, c in self.aliases.items() if c != cid}


class crash_at:
    """Make ``crash_point(name)`` raise :class:`SimulatedCrash` at its ``nth`` hit; ``on_hit`` sees every hit."""

    MODULES = (ledger.blobs, ledger.ledger, ledger.retention)

    def __init__(self, name: str | None, nth: int = 1, on_hit=None) -> None:
        self.name, self.nth, self.on_hit, self.hits = name, nth, on_hit, 0

    def _hook(self, name: str) -> None:
        if self.on_hit:
            self.on_hit(name)
        if name == self.name:
            self.hits += 1
            if self.hits >= self.nth:
                raise SimulatedCrash(name)

    def __enter__(self) -> "crash_at":
        self.saved = [m.crash_point for m in self.MODULES]
        for m in self.MODULES:
            m.crash_point = self._hook
        return self

    def __exit__(self, *exc: object) -> None:
        for m, saved in zip(self.MODULES, self.saved):
            m.crash_point = saved


policies = st.builds(RetentionPolicy, keep_last=st.none() | st.integers(0, 3),
                     keep_every=st.none() | st.sampled_from([10, 25]), keep_best=st.none() | st.integers(0, 2))
metric_values = st.floats(-10, 10, allow_nan=False).map(lambda v: round(v, 2))


class LedgerMachine(RuleBasedStateMachine):
    attempts = Bundle("attempts")

    def __init__(self) -> None:
        super().__init__()
        self.run_dir = Path(tempfile.mkdtemp(prefix="ledger-machine-"))
        self.saved_snapshot_every = ledger.ledger.SNAPSHOT_EVERY
        ledger.ledger.SNAPSHOT_EVERY = 3  # snapshots are written and used all the time
        self.led = Ledger.open(self.run_dir)
        self.operator = Ledger.open(self.run_dir)  # a second writer, like `ckpt-ledger pin` while training runs
        self.abandoned: list[Ledger] = []  # "crashed" handles, deliberately left open
        self.model = Model()
        self.acked: dict[int, str] = {self.led.append(StepCompleted(step=0), event_id="first"): "step.completed"}
        self.n_ckpts = self.n_blobs = 0
        TOTALS["examples"] += 1

    def teardown(self) -> None:
        for handle in [self.led, self.operator, *self.abandoned]:
            handle.close()
        ledger.ledger.SNAPSHOT_EVERY = self.saved_snapshot_every
        shutil.rmtree(self.run_dir, ignore_errors=True)
        COUNTS.parent.mkdir(exist_ok=True)
        COUNTS.write_text(json.dumps(TOTALS, indent=1) + "\n")

    # -- helpers ----------------------------------------------------------------------------------------------

    def ack(self, seq: int, tag: str) -> None:
        assert seq not in self.acked or self.acked[seq] == tag
        self.acked[seq] = tag

    def expect_fenced(self, action) -> None:
        before = self.led.max_seq()
        with pytest.raises(FencedError):
            action()
        assert self.led.max_seq() == before, "a fenced append wrote something"
        TOTALS["zombie_refusals"] += 1

    def reopen(self) -> None:
        TOTALS["crashes"] += 1
        self.abandoned.append(self.led)  # no close(): the process "died" holding it
        if len(self.abandoned) > 4:
            self.abandoned.pop(0).close()
        self.led = Ledger.open(self.run_dir)

    def pick(self, data, ckpts: list[Ckpt], prefer: str | None = None) -> Ckpt:
        """One of ``ckpts``; usually ``prefer`` (an id) or one of the live attempt's, when there is one."""
        ckpts = sorted(ckpts, key=lambda c: c.cid)
        favoured = [c for c in ckpts if c.cid == prefer] if prefer else [c for c in ckpts if c.epoch == self.model.epoch]
        if favoured and data.draw(st.integers(0, 3), label="favour") > 0:
            ckpts = favoured
        return data.draw(st.sampled_from(ckpts), label="checkpoint")

    def write_blob(self, ckpt: Ckpt, rank: int) -> ShardWritten:
        self.n_blobs += 1
        location = f"{self.led.blobs.checkpoint_dir(ckpt.cid, ckpt.epoch)}/rank{rank}-{self.n_blobs}.bin"
        info = self.led.blobs.write(location, f"{ckpt.cid}/{rank}/{self.n_blobs}".encode() * 8,
                                    codec="zstd" if rank % 2 else "none")
        return ShardWritten(checkpoint_id=ckpt.cid, rank=rank, location=info.location, bytes=info.bytes,
                            hash=info.hash, codec=info.codec)

    # -- rules ------------------------------------------------------------------------------------------------

    @initialize(target=attempts)
    def first_attempt(self):
        return self.start_attempt()

    @rule(target=attempts)
    def start_attempt(self):
        resumed_from = self.model.resume()
        attempt = self.led.begin_attempt(host="h", pid=1, resumed_from=resumed_from)
        assert attempt.epoch == self.model.epoch + 1
        self.ack(attempt.seq, "attempt.started")
        self.model.epoch = attempt.epoch
        self.model.base[attempt.epoch] = self.model.head[attempt.epoch] = resumed_from
        return attempt.epoch

    @rule(epoch=attempts)
    def end_attempt(self, epoch):
        from ledger.events import AttemptEnded
        if epoch < self.model.epoch:
            self.expect_fenced(lambda: self.led.append(AttemptEnded(epoch=epoch, reason="completed"), epoch=epoch))
            return
        self.ack(self.led.append(AttemptEnded(epoch=epoch, reason="completed"), epoch=epoch), "attempt.ended")
        self.model.ended.add(epoch)

    @rule(epoch=attempts, step=st.integers(0, 60), n_ranks=st.integers(1, 3))
    def begin_checkpoint(self, epoch, step, n_ranks):
        self.n_ckpts += 1
        ckpt = Ckpt(cid=f"ckpt-{self.n_ckpts}", step=step, epoch=epoch, ranks=list(range(n_ranks)))
        begin = lambda: self.led.begin_checkpoint(checkpoint_id=ckpt.cid, step=step, ranks=ckpt.ranks,  # noqa: E731
                                                  world_size=n_ranks, stack="ddp", epoch=epoch)
        if epoch < self.model.epoch:
            self.expect_fenced(begin)
            return
        self.ack(begin(), "checkpoint.started")
        ckpt.parent, self.model.head[epoch] = self.model.head.get(epoch), ckpt.cid
        self.model.ckpts[ckpt.cid] = ckpt

    @rule(step=st.integers(0, 60), n_ranks=st.integers(1, 3))
    def save_checkpoint(self, step, n_ranks):
        """The whole two-phase protocol by the live attempt: begin, one shard per rank, commit."""
        self.begin_checkpoint(self.model.epoch, step, n_ranks)
        ckpt = self.model.ckpts[f"ckpt-{self.n_ckpts}"]
        shards = [self.write_blob(ckpt, rank) for rank in ckpt.ranks]
        for seq in self.led.record_shards(ckpt.cid, shards, epoch=ckpt.epoch):
            self.ack(seq, "shard.written")
        ckpt.shards.update({s.location: s.rank for s in shards})
        seq = self.led.commit_checkpoint(ckpt.cid, epoch=ckpt.epoch)
        self.ack(seq, "checkpoint.committed")
        ckpt.status, ckpt.commit_seq = "committed", seq

    @precondition(lambda self: self.model.in_flight())
    @rule(data=st.data())
    def write_shard(self, data):
        ckpt = self.pick(data, self.model.in_flight())
        rank = data.draw(st.sampled_from(sorted(ckpt.missing_ranks) or ckpt.ranks), label="rank")
        shard = self.write_blob(ckpt, rank)
        record = lambda: self.led.record_shards(ckpt.cid, [shard], epoch=ckpt.epoch)  # noqa: E731
        if ckpt.epoch < self.model.epoch:
            self.expect_fenced(record)  # a zombie's shard lands under its own e<epoch> dir and is never recorded
            return
        (seq,) = record()
        self.ack(seq, "shard.written")
        ckpt.shards[shard.location] = rank

    @precondition(lambda self: self.model.in_flight())
    @rule(data=st.data())
    def commit(self, data):
        ckpt = self.pick(data, self.model.in_flight())
        commit = lambda: self.led.commit_checkpoint(ckpt.cid, epoch=ckpt.epoch)  # noqa: E731
        if ckpt.epoch < self.model.epoch:
            self.expect_fenced(commit)
        elif ckpt.missing_ranks:
            before = self.led.max_seq()
            with pytest.raises(IncompleteCheckpointError, match=ckpt.cid):
                commit()
            assert self.led.max_seq() == before
            TOTALS["incomplete_commits_refused"] += 1
        else:
            seq = commit()
            self.ack(seq, "checkpoint.committed")
            ckpt.status, ckpt.commit_seq = "committed", seq

    @precondition(lambda self: self.model.in_flight())
    @rule(data=st.data())
    def abort(self, data):
        ckpt = self.pick(data, self.model.in_flight())
        abort = lambda: self.led.abort_checkpoint(ckpt.cid, "rank failed", epoch=ckpt.epoch)  # noqa: E731
        if ckpt.epoch < self.model.epoch:
            self.expect_fenced(abort)
            return
        self.ack(abort(), "checkpoint.aborted")
        ckpt.status = "aborted"
        if self.model.head.get(ckpt.epoch) == ckpt.cid:
            self.model.head[ckpt.epoch] = ckpt.parent

    @precondition(lambda self: self.model.ckpts)
    @rule(data=st.data(), value=metric_values, by_id=st.booleans())
    def record_metric(self, data, value, by_id):
        # Often for an old checkpoint, long after later ones were committed: a late eval.
        ckpt = self.pick(data, list(self.model.ckpts.values()))
        event_ = MetricRecorded(name="eval_loss", value=value, step=ckpt.step, checkpoint_id=ckpt.cid if by_id else None)
        self.ack(self.led.append(event_, epoch=self.model.epoch), "metric.recorded")
        self.model.metrics_by_step[ckpt.step] = value
        if by_id:
            ckpt.metric = value

    @precondition(lambda self: self.model.ckpts)
    @rule(data=st.data(), pin=st.booleans())
    def pin_or_unpin(self, data, pin):
        ckpt = self.pick(data, [c for c in self.model.ckpts.values() if c.status != "deleted"] or list(self.model.ckpts.values()))
        event_ = CheckpointPinned(checkpoint_id=ckpt.cid) if pin else CheckpointUnpinned(checkpoint_id=ckpt.cid)
        self.ack(self.operator.append(event_), event_.__struct_config__.tag)
        ckpt.pinned = pin

    @precondition(lambda self: any(c.status != "deleted" for c in self.model.ckpts.values()))
    @rule(data=st.data())
    def promote_alias(self, data):
        ckpt = self.pick(data, [c for c in self.model.ckpts.values() if c.status != "deleted"])
        self.ack(self.operator.append(AliasPromoted(alias="golden", checkpoint_id=ckpt.cid)), "alias.promoted")
        self.model.aliases["golden"] = ckpt.cid

    @rule(policy=policies, crash_after=st.none() | st.integers(1, 6))
    def run_retention(self, policy, crash_after):
        protected = self.model.protected()
        planned = self.led.apply_retention(policy, epoch=None, dry_run=True)
        assert not {d.checkpoint_id for d in planned} & protected, (planned, protected)
        progress = iter(planned)
        current: list[str] = []
        hits = 0

        def on_hit(name: str) -> None:
            nonlocal hits
            hits += 1
            if name == "retention.after_deletion_requested":
                current[:] = [next(progress).checkpoint_id]
                self.model.delete_requested(current[0])
            elif name == "retention.after_deleted":
                self.model.deleted(current[0])
            if crash_after is not None and hits >= crash_after:
                raise SimulatedCrash(name)

        try:
            with crash_at(None, on_hit=on_hit):
                done = self.led.apply_retention(policy, epoch=None)
        except SimulatedCrash:
            event("retention crashed midway")
            self.reopen()
            return
        assert [d.checkpoint_id for d in done] == [d.checkpoint_id for d in planned]
        for d in done:
            assert self.model.ckpts[d.checkpoint_id].status == "deleted"
            assert not any(self.led.blobs.exists(loc) for loc in d.locations)
        assert not [c for c in self.model.ckpts.values() if c.deletion_requested and not c.deletion_done]

    @precondition(lambda self: any(c.shards and c.status == "committed" for c in self.model.ckpts.values()))
    @rule(data=st.data(), how=st.sampled_from(["flip", "truncate", "delete"]))
    def corrupt_shard(self, data, how):
        ckpt = self.pick(data, [c for c in self.model.ckpts.values() if c.shards and c.status == "committed"],
                         prefer=self.model.resume())
        location = data.draw(st.sampled_from(sorted(ckpt.shards)), label="location")
        path = self.led.blobs.path(location)
        if not path.exists():
            return
        blob = path.read_bytes()
        if how == "flip":
            path.write_bytes(blob[:3] + bytes([blob[3] ^ 0x40]) + blob[4:])
        elif how == "truncate":
            path.write_bytes(blob[:-2])
        else:
            path.unlink()
        ckpt.corrupted.add(location)

    @rule()
    def load_resume_target(self):
        """What a restart does: verify the resume target, report corruption, fall back to the next one."""
        for _ in range(len(self.model.ckpts) + 1):  # each report must rule one checkpoint out
            target = self.led.projection().resume
            if target is None:
                return
            try:
                for shard in target.shards:
                    self.led.blobs.verify(shard.location, shard.hash, shard.bytes)
                return
            except CorruptBlobError as err:
                assert err.location in self.model.ckpts[target.checkpoint_id].corrupted, "false corruption alarm"
                seq = self.led.report_corruption(target.checkpoint_id, err.location, err.expected_hash, err.found_hash,
                                                 epoch=self.model.epoch)
                self.ack(seq, "corruption.detected")
                self.model.ckpts[target.checkpoint_id].status = "corrupt"
                TOTALS["corruptions_reported"] += 1
        raise AssertionError("reporting corruption did not move the resume target")

    @rule(epoch=attempts, step=st.integers(0, 60), via_old_handle=st.booleans())
    def train_step(self, epoch, step, via_old_handle):
        """Append a step from some attempt; a stale one is a zombie (maybe on its own old connection)."""
        handle = self.abandoned[-1] if via_old_handle and self.abandoned else self.led
        append = lambda: handle.append(StepCompleted(step=step), epoch=epoch)  # noqa: E731
        if epoch < self.model.epoch:
            self.expect_fenced(append)
        else:
            self.ack(append(), "step.completed")

    @rule()
    def crash(self):
        self.reopen()

    @precondition(lambda self: any(c.epoch == self.model.epoch for c in self.model.in_flight()))
    @rule(data=st.data(), point=st.sampled_from(["blob.after_temp_write", "blob.after_rename",
                                                 "ledger.after_shard_written", "ledger.before_commit",
                                                 "ledger.after_commit"]))
    def crash_mid_checkpoint(self, data, point):
        ckpt = self.pick(data, [c for c in self.model.in_flight() if c.epoch == self.model.epoch])
        try:
            with crash_at(point):
                if point.startswith(("blob.", "ledger.after_shard")) or ckpt.missing_ranks:
                    shard = self.write_blob(ckpt, data.draw(st.sampled_from(ckpt.ranks), label="rank"))
                    self.led.record_shards(ckpt.cid, [shard], epoch=ckpt.epoch)
                    ckpt.shards[shard.location] = shard.rank  # it landed (the crash point was elsewhere)
                else:
                    seq = self.led.commit_checkpoint(ckpt.cid, epoch=ckpt.epoch)
                    ckpt.status, ckpt.commit_seq = "committed", seq
        except SimulatedCrash:
            if point == "ledger.after_shard_written":
                ckpt.shards[shard.location] = shard.rank  # durable, though the caller never heard back
            elif point == "ledger.after_commit":
                ckpt.status, ckpt.commit_seq = "committed", self.led.max_seq()
            self.reopen()
            # The unacknowledged append (if it landed) is now acknowledged by the log itself.
            if point in ("ledger.after_shard_written", "ledger.after_commit"):
                self.ack(self.led.max_seq(), "shard.written" if point == "ledger.after_shard_written" else "checkpoint.committed")

    # -- invariants -------------------------------------------------------------------------------------------

    @invariant()
    def decisions_match_the_model(self):
        view = self.led.projection()
        note(f"model resume={self.model.resume()} latest={self.model.latest()} best={self.model.best()}")
        assert (view.resume and view.resume.checkpoint_id) == self.model.resume()
        assert (view.latest and view.latest.checkpoint_id) == self.model.latest()
        assert (view.best and view.best.checkpoint_id) == self.model.best()
        for cid, ckpt in self.model.ckpts.items():
            got = view.checkpoints[cid]
            assert (got.status, got.pinned, got.deletion_requested, got.deletion_done) == (
                ckpt.status, ckpt.pinned, ckpt.deletion_requested, ckpt.deletion_done), cid

    @invariant()
    def every_projection_path_agrees(self):
        replayed = self.led.full_replay()
        full = encode_state(replayed)
        truth = view_facts(View(replayed))
        for handle in (self.led, self.operator, Ledger.open(self.run_dir, read_only=True)):
            view = handle.projection()
            assert isinstance(view, ReadModelView), "the read model fell behind the log"
            assert view_facts(view) == truth  # the read model, after crashes, zombies and retention
            assert encode_state(view.state) == full  # the snapshot + tail fold behind it

    @invariant()
    def seqs_contiguous_and_every_acknowledged_append_present(self):
        stored = Ledger.open(self.run_dir, read_only=True).events()
        assert [s.seq for s in stored] == list(range(1, len(stored) + 1))
        for seq, tag in self.acked.items():
            assert stored[seq - 1].tag == tag, f"acknowledged seq {seq} ({tag}) is {stored[seq - 1].tag}"

    @invariant()
    def committed_checkpoints_have_every_rank(self):
        for ckpt in self.led.projection().checkpoints.values():
            if ckpt.committed_seq is not None:
                assert set(ckpt.ranks) <= {s.rank for s in ckpt.shards}, ckpt.checkpoint_id

    @invariant()
    def resume_target_verifies_unless_corrupted(self):
        target = self.led.projection().resume
        if target is not None and not self.model.ckpts[target.checkpoint_id].corrupted:
            for shard in target.shards:
                self.led.blobs.verify(shard.location, shard.hash, shard.bytes)


TestLedgerMachine = LedgerMachine.TestCase


def test_crash_budget_is_reported(crash_counter):
    """Runs after the machine (same module): the CI profile must inject a few hundred crashes."""
    if TOTALS["examples"] == 0:
        pytest.skip("the state machine did not run in this session")
    print(f"\nstateful machine: {json.dumps(TOTALS)}")
    crash_counter("stateful machine", TOTALS["crashes"])
    assert TOTALS["crashes"] >= 2 * TOTALS["examples"]
