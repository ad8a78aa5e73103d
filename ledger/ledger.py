"""``Ledger``: the Python API over one run's event log, blob store and projection."""

from __future__ import annotations

import os
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ledger import retention
from ledger.blobs import BlobStore, blob_store_for
from ledger.decisions import BestRule
from ledger.errors import CorruptBlobError, DuplicateCheckpointError, IncompleteCheckpointError, LedgerError
from ledger.events import (
    AttemptStarted,
    CheckpointAborted,
    CheckpointCommitted,
    CheckpointStarted,
    CorruptionDetected,
    Event,
    RunStarted,
    ShardWritten,
)
from ledger.faults import crash_point
from ledger.projection import PROJECTION_VERSION, State, decode_state, encode_state, fold_chunks
from ledger.store import (
    LEDGER_FILE,
    OPERATOR_EPOCH,
    LogReader,
    LogWriter,
    StoredEvent,
    checkpoint_events,
    iter_event_chunks,
    latest_snapshot,
    latest_snapshot_seq,
    max_seq,
    read_events,
)
from ledger.view import View

#: A writer stores a snapshot once this many events have accumulated past the last one.
SNAPSHOT_EVERY = 5000
#: ``close()`` stores a snapshot if at least this many events came after the last one, so
#: the next cold open (a restarting job, ``inspect``) folds only a short tail.
SNAPSHOT_ON_CLOSE = 500

#: Facts after which a checkpoint can never be committed (a pin, alias or metric does not end it).
_ENDS_IN_FLIGHT = frozenset({
    "checkpoint.committed", "checkpoint.aborted", "checkpoint.deletion_requested", "checkpoint.deleted",
    "corruption.detected",
})


@dataclass(frozen=True, slots=True)
class Attempt:
    """A begun attempt; ``epoch`` is its fencing token for every append."""

    epoch: int
    seq: int
    event: AttemptStarted


class Ledger:
    """One run's ledger. Open with :meth:`open`; writers and read-only readers share this API."""

    def __init__(self, run_dir: Path, log: LogWriter | LogReader, read_only: bool,
                 blobs: BlobStore | None = None) -> None:
        self.run_dir = run_dir
        self.read_only = read_only
        self._log = log
        self._blobs = blobs
        self._cache: tuple[int, bytes] | None = None  # (seq, encoded state) of the newest projection
        self._snapshot_seq: int | None = None  # seq covered by the newest stored snapshot (writers)

    @classmethod
    def open(cls, run_dir: str | os.PathLike[str], *, read_only: bool = False,
             blobs: BlobStore | None = None) -> "Ledger":
        """Open ``RUN_DIR/ledger.db``. Writers create it if missing; read-only never creates or changes a file.

        ``blobs``: where the shards are; by default the store ``run.started`` recorded (the run
        directory when it recorded none).
        """
        run_dir = Path(run_dir)
        path = run_dir / LEDGER_FILE
        log: LogWriter | LogReader = LogReader(path) if read_only else LogWriter(path)
        return cls(run_dir, log, read_only, blobs)

    @property
    def blobs(self) -> BlobStore:
        """The run's blob store, found from ``run.started.blobs`` on first use (so a command that
        never touches a blob never connects to a remote store)."""
        if self._blobs is None:
            started = self.events(tags=["run.started"])
            url = started[0].event.blobs if started else None  # type: ignore[attr-defined]
            if not started:
                return blob_store_for(None, self.run_dir)  # not cached: start_run may still record one
            self._blobs = blob_store_for(url, self.run_dir)
        return self._blobs

    @property
    def path(self) -> Path:
        """The ledger database file."""
        return self._log.path

    def close(self) -> None:
        """Release the database connection (writers only hold one), snapshotting a long unsnapshotted tail first."""
        if isinstance(self._log, LogWriter):
            try:
                self._snapshot_if_behind(SNAPSHOT_ON_CLOSE)
            except LedgerError:
                pass  # a snapshot is only a cache: failing to store one must not make close() fail
            self._log.close()

    def _snapshot_if_behind(self, threshold: int) -> None:
        def behind(conn: sqlite3.Connection) -> int:
            newest = max_seq(conn)
            return newest - latest_snapshot_seq(conn, at_most=newest, projection_version=PROJECTION_VERSION)

        if self._log.query(behind) >= threshold:
            self.projection()  # folds from the in-memory cache and refreshes it
            seq, state = self._cache  # type: ignore[misc]
            self._writer().save_snapshot(seq, PROJECTION_VERSION, state)
            self._snapshot_seq = seq

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------

    def _writer(self) -> LogWriter:
        if not isinstance(self._log, LogWriter):
            raise LedgerError(f"{self.path} was opened read-only; open it with read_only=False to append")
        return self._log

    def append(self, event: Event, *, epoch: int | None = None, event_id: str | None = None) -> int:
        """Append one event under ``epoch`` (``None``: an operator write outside any attempt). Returns its seq.

        Raises :class:`~ledger.errors.FencedError` if a newer attempt has begun.
        Re-appending an ``event_id`` that is already stored is a no-op returning its seq.
        """
        return self.append_many([event], epoch=epoch, event_ids=[event_id])[0]

    def append_many(
        self, events: Sequence[Event], *, epoch: int | None = None, event_ids: Sequence[str | None] | None = None
    ) -> list[int]:
        """Append several events in one transaction (all or none)."""
        if not events:
            return []
        return self._writer().append(events, epoch=OPERATOR_EPOCH if epoch is None else epoch, event_ids=event_ids)

    def start_run(self, *, run_id: str, config: dict[str, Any], config_hash: str = "", code_id: str | None = None,
                  blobs: str | None = None) -> RunStarted:
        """Record the run's identity once; later calls return the stored ``run.started``.

        ``blobs``: the blob store URL or directory (never with credentials; ``None``: the run directory).
        """
        if blobs is not None:
            blob_store_for(blobs, self.run_dir)  # refuses a URL with credentials before it is recorded
        self.append(RunStarted(run_id=run_id, config=config, config_hash=config_hash, code_id=code_id, blobs=blobs),
                    event_id="run.started")
        stored = self._writer().query(lambda c: read_events(c, tags=["run.started"]))
        return stored[0].event  # type: ignore[return-value]

    def begin_attempt(
        self,
        *,
        job_id: str | None = None,
        slurm: dict[str, Any] | None = None,
        host: str | None = None,
        pid: int | None = None,
        world_size: int = 1,
        stack: str = "",
        topology: dict[str, int] | None = None,
        resumed_from: str | None = None,
        previous_topology: dict[str, Any] | None = None,
    ) -> Attempt:
        """Start a new attempt: its epoch (previous max + 1) fences every older attempt, atomically."""
        def make(epoch: int) -> AttemptStarted:
            return AttemptStarted(
                epoch=epoch, job_id=job_id, slurm=slurm, host=host if host is not None else socket.gethostname(),
                pid=pid if pid is not None else os.getpid(), world_size=world_size, stack=stack,
                topology=dict(topology or {}), resumed_from=resumed_from, previous_topology=previous_topology,
            )

        epoch, seq = self._writer().begin_epoch(make)
        return Attempt(epoch=epoch, seq=seq, event=make(epoch))

    # -- two-phase checkpoint protocol -------------------------------------------------------

    def begin_checkpoint(
        self, *, checkpoint_id: str, step: int, ranks: Sequence[int], world_size: int, stack: str,
        topology: dict[str, int] | None = None, epoch: int,
    ) -> int:
        """Phase 1: announce a checkpoint and the ranks whose shards must all arrive before commit."""
        self.blobs.checkpoint_dir(checkpoint_id, epoch)  # validates the id before anything is recorded
        event = CheckpointStarted(checkpoint_id=checkpoint_id, step=step, ranks=sorted(set(ranks)),
                                  world_size=world_size, stack=stack, topology=dict(topology or {}))

        def make_started(conn: sqlite3.Connection) -> CheckpointStarted:
            # Ids are never reused: another attempt's save under this id (even a dead one's)
            # would otherwise be mistaken for ours, and retention could delete it under us.
            for stored in checkpoint_events(conn, checkpoint_id):
                if isinstance(stored.event, CheckpointStarted):
                    raise DuplicateCheckpointError(
                        f"checkpoint id {checkpoint_id!r} was already begun by attempt {stored.epoch} (seq "
                        f"{stored.seq}); use a new id, e.g. one that includes the attempt epoch"
                    )
            return event

        # The epoch in the event id makes a retry by the same attempt a no-op.
        return self._writer().append_computed(make_started, epoch=epoch, event_id=f"{checkpoint_id}:started:e{epoch}")

    def record_shards(self, checkpoint_id: str, shards: Sequence[ShardWritten], *, epoch: int) -> list[int]:
        """Record durably written shard files (one ``shard.written`` each, in one transaction)."""
        for shard in shards:
            if shard.checkpoint_id != checkpoint_id:
                raise ValueError(f"shard {shard.location} belongs to {shard.checkpoint_id}, not {checkpoint_id}")
        seqs = self.append_many(list(shards), epoch=epoch,
                                event_ids=[f"{checkpoint_id}:shard:{s.location}" for s in shards])
        crash_point("ledger.after_shard_written")
        return seqs

    def commit_checkpoint(self, checkpoint_id: str, *, epoch: int, verify: bool = False) -> int:
        """Phase 2: commit — refused unless every expected rank recorded shards (and, with ``verify``, they hash right).

        The check runs inside the commit's own transaction, so nothing (an abort, a
        newer attempt) can slip in between the check and the commit.
        """
        blobs = self.blobs if verify else None  # resolved outside the transaction: it may read the log

        def make_commit(conn: sqlite3.Connection) -> CheckpointCommitted:
            started, started_epoch, shards, ended = None, None, {}, None
            for stored in checkpoint_events(conn, checkpoint_id):
                ev = stored.event
                if isinstance(ev, CheckpointStarted):
                    started, started_epoch = ev, stored.epoch
                elif isinstance(ev, ShardWritten):
                    shards[ev.location] = ev
                elif stored.tag in _ENDS_IN_FLIGHT:
                    ended = ended or stored.tag
            if started is None:
                raise IncompleteCheckpointError(f"cannot commit {checkpoint_id}: it was never begun")
            if ended is not None:
                raise IncompleteCheckpointError(f"cannot commit {checkpoint_id}: the log already has {ended} for it")
            if started_epoch != epoch:
                raise IncompleteCheckpointError(
                    f"cannot commit {checkpoint_id}: it was begun by attempt {started_epoch}, not attempt {epoch}; "
                    "only the attempt that wrote a checkpoint may commit it"
                )
            missing = sorted(set(started.ranks) - {s.rank for s in shards.values()})
            if missing:
                raise IncompleteCheckpointError(
                    f"cannot commit {checkpoint_id}: no shard recorded for rank(s) {missing}; abort it instead"
                )
            if blobs is not None:
                for shard in shards.values():
                    blobs.verify(shard.location, shard.hash, shard.bytes)
            return CheckpointCommitted(checkpoint_id=checkpoint_id, step=started.step)

        crash_point("ledger.before_commit")
        seq = self._writer().append_computed(make_commit, epoch=epoch, event_id=f"{checkpoint_id}:committed")
        crash_point("ledger.after_commit")
        return seq

    def abort_checkpoint(self, checkpoint_id: str, reason: str, *, epoch: int | None) -> int:
        """Record that a checkpoint will never be committed."""
        return self.append(CheckpointAborted(checkpoint_id=checkpoint_id, reason=reason), epoch=epoch,
                           event_id=f"{checkpoint_id}:aborted")

    def report_corruption(self, checkpoint_id: str, location: str, expected_hash: str | None,
                          found_hash: str | None, *, epoch: int | None) -> int:
        """Record that a shard failed verification (the checkpoint is never loaded again)."""
        return self.append(CorruptionDetected(checkpoint_id=checkpoint_id, location=location,
                                              expected_hash=expected_hash, found_hash=found_hash), epoch=epoch)

    def verify_checkpoint(self, checkpoint_id: str) -> None:
        """Re-hash every shard of a checkpoint; raises :class:`CorruptBlobError` on the first bad one."""
        ckpt = self.projection().checkpoint(checkpoint_id)
        for shard in ckpt.shards:
            self.blobs.verify(shard.location, shard.hash, shard.bytes)

    def apply_retention(self, policy: retention.RetentionPolicy, *, epoch: int | None,
                        dry_run: bool = False) -> list[retention.Deletion]:
        """Plan retention from the projection and (unless ``dry_run``) carry it out crash-safely."""
        view = self.projection()
        planned = retention.plan(view.state, policy, view.best_rule)
        if dry_run or not planned:
            return planned
        return retention.execute(self, planned, epoch=OPERATOR_EPOCH if epoch is None else epoch)

    # -- reading -----------------------------------------------------------------------------

    def events(self, *, after_seq: int = 0, until_seq: int | None = None,
               tags: Sequence[str] | None = None) -> list[StoredEvent]:
        """Stored events in log order, optionally a range and only some tags."""
        return self._log.query(lambda c: read_events(c, after_seq=after_seq, until_seq=until_seq, tags=tags))

    def max_seq(self) -> int:
        """The newest sequence number (0 when empty)."""
        return self._log.query(max_seq)

    def projection(self, at: int | None = None, *, best_rule: BestRule | None = None) -> View:
        """The run as of sequence ``at`` (default: now): snapshot + tail, folded."""
        if at is not None and at < 0:
            raise ValueError(f"sequence number must be >= 0, got {at}")
        state, seq, folded, snapshot_seq = self._log.query(lambda c: self._fold_to(c, at), "project the ledger")
        if at is None and isinstance(self._log, LogWriter):
            # Cache the encoded state (bytes, immutable) so the next call folds only the tail.
            if folded or self._cache is None or self._cache[0] != seq:
                self._cache = (seq, encode_state(state))
            # Snapshot by distance from the last one, not by this call's tail: a trainer
            # projects after every commit, folding a few events at a time.
            if self._snapshot_seq is None:
                self._snapshot_seq = snapshot_seq
            if seq - self._snapshot_seq >= SNAPSHOT_EVERY:
                self._log.save_snapshot(seq, PROJECTION_VERSION, self._cache[1])
                self._snapshot_seq = seq
        return View(state, best_rule)

    def _fold_to(self, conn: sqlite3.Connection, at: int | None) -> tuple[State, int, int, int]:
        """Fold up to ``at``: returns (state, its seq, events folded, seq of the newest stored snapshot)."""
        newest = max_seq(conn)
        target = newest if at is None else min(at, newest)
        start_seq, start = 0, None
        if self._cache is not None and self._cache[0] <= target:
            start_seq, start = self._cache
        snapshot_seq = latest_snapshot_seq(conn, at_most=target, projection_version=PROJECTION_VERSION)
        if snapshot_seq > start_seq:  # read the (possibly large) snapshot only when it is the better start
            snap = latest_snapshot(conn, at_most=target, projection_version=PROJECTION_VERSION)
            if snap is not None:
                start_seq, start = snap
        state = decode_state(start) if start is not None else State()
        state = fold_chunks(iter_event_chunks(conn, after_seq=start_seq, until_seq=target), state)
        state.seq = target
        return state, target, target - start_seq, snapshot_seq

    def full_replay(self, at: int | None = None) -> State:
        """Fold the whole log from seq 1, ignoring snapshots and caches (for checks and tests)."""
        return self._log.query(lambda c: fold_chunks(iter_event_chunks(c, until_seq=at)))
