"""``Ledger``: the Python API over one run's event log, blob store and projection."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ledger import retention
from ledger.blobs import BlobStore, blob_store_for
from ledger.decisions import BestRule, alias_updates
from ledger.errors import CorruptBlobError, DuplicateCheckpointError, FencedError, IncompleteCheckpointError, LedgerError
from ledger.events import (
    AliasPromoted,
    AliasRemoved,
    AttemptStarted,
    CheckpointAborted,
    CheckpointCommitted,
    CheckpointStarted,
    CorruptionDetected,
    Event,
    MetricRecorded,
    RunStarted,
    ShardWritten,
)
from ledger.faults import crash_point
from ledger.health import (
    LedgerHealth,
    protocol_anomalies,
    read_model_anomalies,
    snapshot_anomaly,
    store_anomalies,
)
from ledger.projection import PROJECTION_VERSION, AttemptState, State, encode_state, fold_chunks
from ledger.read_model import READ_MODEL_VERSION, ReadModelFolder, load_state, open_view
from ledger.run_address import PostgresRun, parse_run_address
from ledger.store import (
    OPERATOR_EPOCH,
    LedgerStore,
    Snapshot,
    StoredEvent,
    StoreReader,
    open_store,
    read_consistent,
)
from ledger.view import View

#: A writer stores a snapshot once this many events have accumulated past the last one.
SNAPSHOT_EVERY = 5000
#: ``close()`` stores a snapshot if at least this many events came after the last one, so
#: the next cold open (a restarting job, ``inspect``) folds only a short tail.
SNAPSHOT_ON_CLOSE = 500

#: Sequence numbers read per transaction by :meth:`Ledger.iter_events`.
PAGE = 2000

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

    promote_aliases: bool = True
    """Append ``alias.promoted`` when ``latest``/``best`` move (after a commit, a metric, a new attempt or
    a corruption report). Tests that need an exact event sequence may turn it off on an instance."""

    def __init__(self, run_dir: Path | PostgresRun, store: LedgerStore, read_only: bool,
                 blobs: BlobStore | None = None) -> None:
        self.run_dir = run_dir
        self.read_only = read_only
        self._store = store
        # Where the shards are: found from run.started.blobs on first use (see ``blobs``).
        self._blobs = blobs
        # Writers fold every append into the read model inside its transaction (ledger/read_model.py).
        self._folder = None if read_only else ReadModelFolder()
        self._snapshot_seq: int | None = None  # seq covered by the newest stored snapshot (writers)
        self._closed = False
        self._reader_after_close: LedgerStore | None = None
        if self._folder is not None:
            self._rebuild_read_model_if_stale()

    @classmethod
    def open(cls, run_dir: str | os.PathLike[str] | PostgresRun, *, read_only: bool = False,
             blobs: BlobStore | None = None) -> "Ledger":
        """Open ``RUN_DIR/ledger.db``, or a run in a PostgreSQL database (``postgresql://…/DB?run=NAME``).

        Writers create the ledger (a PostgreSQL schema and run row) if missing; read-only
        never creates or changes anything. ``blobs``: where the shards are; by default the
        store ``run.started`` recorded (the run directory when it recorded none).
        """
        address = parse_run_address(run_dir)
        return cls(address, open_store(address, read_only=read_only), read_only, blobs)

    @property
    def blobs(self) -> BlobStore:
        """The run's blob store, found from ``run.started.blobs`` on first use (so a command that
        never touches a blob never connects to a remote store)."""
        if self._blobs is None:
            started = self.events(tags=["run.started"])
            url = started[0].event.blobs if started else None  # type: ignore[attr-defined]
            if url is None and not isinstance(self.run_dir, Path):
                raise LedgerError(f"run {self.run_dir} is in a database and recorded no blob store; start it with "
                                  "--blobs DIR|URL (a PostgreSQL run has no directory to keep shards in)")
            if not started:
                return blob_store_for(None, self.run_dir)  # not cached: start_run may still record one
            self._blobs = blob_store_for(url, self.run_dir)
        return self._blobs

    @property
    def path(self) -> Path:
        """The ledger database file (for a PostgreSQL run, its URL as a path: use :attr:`location`)."""
        return Path(self._store.location)

    @property
    def location(self) -> str:
        """Where the ledger lives, for messages: the file path or the run's URL (never a password)."""
        return self._store.location

    @property
    def store(self) -> LedgerStore:
        """The storage backend (for backend-specific diagnostics; everything else goes through this class)."""
        return self._store

    def close(self) -> None:
        """Release the database connection (writers only hold one), snapshotting a long unsnapshotted tail first."""
        if not self.read_only:
            try:
                self._snapshot_if_behind(SNAPSHOT_ON_CLOSE)
            except LedgerError:
                pass  # a snapshot is only a cache: failing to store one must not make close() fail
        self._store.close()
        self._closed = True

    def _read(self, fn: Any) -> Any:
        return read_consistent(self._store, fn)

    def _read_for_view(self, fn: Any) -> Any:
        """Reads of a view's lazily loaded parts: a view stays readable after its writer closed the ledger."""
        if not self._closed or self.read_only:
            return self._read(fn)
        if self._reader_after_close is None:
            self._reader_after_close = open_store(self.run_dir, read_only=True)
        return read_consistent(self._reader_after_close, fn)

    def _snapshot_if_behind(self, threshold: int) -> None:
        def behind(reader: StoreReader) -> int:
            newest = reader.max_seq()
            return newest - reader.snapshot_seq(at_most=newest, projection_version=PROJECTION_VERSION)

        if self._read(behind) >= threshold:
            self._save_snapshot()

    def _save_snapshot(self) -> None:
        folder = self._folder
        assert folder is not None
        seq = self.max_seq()
        data = folder.encoded_at(seq)
        if data is None:
            data = encode_state(self._read(lambda r: load_state(r, seq)))
        self._writer().save_snapshot(Snapshot(seq=seq, projection_version=PROJECTION_VERSION, state=data))
        self._snapshot_seq = seq

    def _snapshot_if_far(self) -> None:
        """After an append: snapshot once :data:`SNAPSHOT_EVERY` events have come since the last one."""
        folder = self._folder
        live = folder.state if folder is not None else None
        if live is None:
            return
        if self._snapshot_seq is None:
            self._snapshot_seq = self._read(
                lambda r: r.snapshot_seq(at_most=r.max_seq(), projection_version=PROJECTION_VERSION))
        if live.seq - self._snapshot_seq >= SNAPSHOT_EVERY:
            self._save_snapshot()

    def _rebuild_read_model_if_stale(self) -> None:
        """A writer's open: bring a missing, older or lagging read model up to the log (readers never write it)."""
        current = self._read(lambda r: r.read_model_seq(version=READ_MODEL_VERSION) == r.max_seq())
        if not current:
            self._store.append([], epoch=OPERATOR_EPOCH, maintainer=self._folder)

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------

    def _writer(self) -> LedgerStore:
        if self.read_only:
            raise LedgerError(f"{self.location} was opened read-only; open it with read_only=False to append")
        return self._store

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
        seqs = self._writer().append(events, epoch=OPERATOR_EPOCH if epoch is None else epoch, event_ids=event_ids,
                                     maintainer=self._folder)
        self._snapshot_if_far()
        return seqs

    def start_run(self, *, run_id: str, config: dict[str, Any], config_hash: str = "", code_id: str | None = None,
                  blobs: str | None = None, ledger_version: str | None = None) -> RunStarted:
        """Record the run's identity once; later calls return the stored ``run.started``.

        ``code_id``: the user's code; ``blobs``: the blob store URL or directory (never with credentials;
        ``None``: the run directory); ``ledger_version``: the ckpt-ledger that wrote it.
        """
        if blobs is not None:
            blob_store_for(blobs, self.run_dir)  # refuses a URL with credentials before it is recorded
        self.append(RunStarted(run_id=run_id, config=config, config_hash=config_hash, code_id=code_id, blobs=blobs,
                               ledger_version=ledger_version), event_id="run.started")
        (stored,) = self._read(lambda reader: list(reader.events(tags=["run.started"], limit=1)))
        return stored.event  # type: ignore[return-value]

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

        epoch, seq = self._writer().begin_epoch(make, maintainer=self._folder)
        self._promote_aliases(epoch)  # an explicit resume moves the branch, and latest with it
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

        def make_started(about: Sequence[StoredEvent]) -> CheckpointStarted:
            # Ids are never reused: another attempt's save under this id (even a dead one's)
            # would otherwise be mistaken for ours, and retention could delete it under us.
            for stored in about:
                if isinstance(stored.event, CheckpointStarted):
                    raise DuplicateCheckpointError(
                        f"checkpoint id {checkpoint_id!r} was already begun by attempt {stored.epoch} (seq "
                        f"{stored.seq}); use a new id, e.g. one that includes the attempt epoch"
                    )
            return event

        # The epoch in the event id makes a retry by the same attempt a no-op.
        return self._writer().append_checked(make_started, checkpoint_id=checkpoint_id, epoch=epoch,
                                             event_id=f"{checkpoint_id}:started:e{epoch}", maintainer=self._folder)

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

        def make_commit(about: Sequence[StoredEvent]) -> CheckpointCommitted:
            started, started_epoch, shards, ended = None, None, {}, None
            for stored in about:
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
        seq = self._writer().append_checked(make_commit, checkpoint_id=checkpoint_id, epoch=epoch,
                                            event_id=f"{checkpoint_id}:committed", maintainer=self._folder)
        crash_point("ledger.after_commit")
        self._promote_aliases(epoch)
        return seq

    def abort_checkpoint(self, checkpoint_id: str, reason: str, *, epoch: int | None) -> int:
        """Record that a checkpoint will never be committed."""
        return self.append(CheckpointAborted(checkpoint_id=checkpoint_id, reason=reason), epoch=epoch,
                           event_id=f"{checkpoint_id}:aborted")

    def report_corruption(self, checkpoint_id: str, location: str, expected_hash: str | None,
                          found_hash: str | None, *, epoch: int | None) -> int:
        """Record that a shard failed verification (the checkpoint is never loaded again)."""
        seq = self.append(CorruptionDetected(checkpoint_id=checkpoint_id, location=location,
                                             expected_hash=expected_hash, found_hash=found_hash), epoch=epoch)
        self._promote_aliases(epoch)
        return seq

    def record_metric(self, name: str, value: float, step: int, checkpoint_id: str | None, *, epoch: int | None) -> int:
        """Record a measured metric (e.g. ``eval_loss``), possibly long after its checkpoint; ``best`` may move."""
        seq = self.append(MetricRecorded(name=name, value=value, step=step, checkpoint_id=checkpoint_id), epoch=epoch)
        self._promote_aliases(epoch)
        return seq

    def _promote_aliases(self, epoch: int | None) -> None:
        """Append ``alias.promoted``/``alias.removed`` for ``latest``/``best`` if they moved (history for people:
        decisions are made from the projection, never from these events)."""
        if not self.promote_aliases:
            return
        view = self.projection()  # the read model answers latest/best/aliases without folding the state
        rule, best = view.best_rule, view.best
        events: list[Event] = []
        wanted = {"latest": view.latest, "best": best.checkpoint if best is not None else None}
        for alias, target in alias_updates(wanted, view.aliases):
            if target is None:
                events.append(AliasRemoved(alias=alias, reason="no usable checkpoint on the current branch"
                                           if alias == "latest" else f"no usable checkpoint has {rule.metric}"))
            else:
                why = ("head of the current branch" if alias == "latest" or best is None
                       else f"{rule.mode} {rule.metric} = {best.value:.6g}")
                events.append(AliasPromoted(alias=alias, checkpoint_id=target.checkpoint_id, reason=why))
        if events:
            try:
                self.append_many(events, epoch=epoch)
            except FencedError:
                pass  # a newer attempt owns the run; it records the aliases it moves

    def verify_checkpoint(self, checkpoint_id: str) -> None:
        """Re-hash every shard of a checkpoint; raises :class:`CorruptBlobError` on the first bad one."""
        ckpt = self.projection().checkpoint(checkpoint_id)
        for shard in ckpt.shards:
            self.blobs.verify(shard.location, shard.hash, shard.bytes)

    def apply_retention(self, policy: retention.RetentionPolicy, *, epoch: int | None,
                        dry_run: bool = False) -> list[retention.Deletion]:
        """Plan retention from the projection and (unless ``dry_run``) carry it out crash-safely."""
        view = self.projection()
        planned = retention.plan(view.state, policy, view.best_rule, now=time.time())
        if dry_run or not planned:
            return planned
        return retention.execute(self, planned, epoch=OPERATOR_EPOCH if epoch is None else epoch)

    # -- reading -----------------------------------------------------------------------------

    def events(self, *, after_seq: int = 0, until_seq: int | None = None,
               tags: Sequence[str] | None = None) -> list[StoredEvent]:
        """Stored events in log order, optionally a range and only some tags (all in memory: see :meth:`iter_events`)."""
        return self._read(lambda r: list(r.events(after=after_seq, until=until_seq, tags=tags)))

    def iter_events(self, *, after: int = 0, until: int | None = None, tags: Sequence[str] | None = None,
                    page: int = PAGE) -> Iterator[StoredEvent]:
        """Events with ``after < seq <= until`` (only ``tags`` if given), in log order, read ``page`` seqs at a time.

        A big log is never held in memory, and the first event arrives at once. The log
        is append-only, so pages read in separate transactions still form one
        consistent prefix (the newest seq is fixed when iteration starts).
        """
        if page < 1:
            raise ValueError(f"page must be >= 1, got {page}")
        newest = self.max_seq()
        end = newest if until is None else min(until, newest)
        while after < end:
            upto = min(after + page, end)
            yield from self.events(after_seq=after, until_seq=upto, tags=tags)
            after = upto

    def event_at(self, seq: int) -> StoredEvent | None:
        """The event stored at ``seq`` (``None`` past the end of the log)."""
        found = self._read(lambda r: list(r.events(after=seq - 1, until=seq)))
        return found[0] if found else None

    def last_events(self, attempts: Iterable[AttemptState]) -> dict[int, StoredEvent]:
        """The newest event of each attempt (by epoch), read in one transaction (an attempt's ``last_seq``)."""
        wanted = {a.epoch: a.last_seq for a in attempts}

        def read(reader: StoreReader) -> dict[int, StoredEvent]:
            found = {}
            for epoch, seq in wanted.items():
                stored = next(reader.events(after=seq - 1, until=seq), None)
                if stored is not None:
                    found[epoch] = stored
            return found

        return self._read(read) if wanted else {}

    def max_seq(self) -> int:
        """The newest sequence number (0 when empty)."""
        return self._read(lambda r: r.max_seq())

    def projection(self, at: int | None = None, *, best_rule: BestRule | None = None) -> View:
        """The run as of sequence ``at`` (default: now).

        Now: answered from the read model (indexed reads) when it covers the whole log;
        otherwise, and in the past, the newest snapshot at or before ``at`` plus the tail, folded.
        """
        if at is not None and at < 0:
            raise ValueError(f"sequence number must be >= 0, got {at}")

        def read(reader: StoreReader) -> View:
            view = open_view(reader, at, best_rule, self._read_for_view, self._folder)
            if view is not None:
                return view
            newest = reader.max_seq()
            return View(load_state(reader, newest if at is None else min(at, newest)), best_rule)

        return self._read(read)

    def full_replay(self, at: int | None = None) -> State:
        """Fold the whole log from seq 1, ignoring snapshots and caches (for checks and tests)."""
        return self._read(lambda r: fold_chunks(r.replay_parts(until=at)))

    def health(self, *, thorough: bool = False) -> LedgerHealth:
        """Check the ledger itself (never the blobs): the store's integrity, its caches against a replay,
        and the protocol violations in the log. ``thorough`` runs the slow full database check."""
        store = self._read(lambda reader: reader.health(thorough=thorough))
        view = self.projection()
        state = view.state
        anomalies = store_anomalies(store, self.location)
        # A replay reads only the step of a step event: decode every payload too, so a damaged
        # one is still refused by its seq (CorruptLedgerError), as a full decode always did.
        self._read(lambda r: all(chunk.events is not None for chunk in r.chunks(until=state.seq)))
        replayed = self.full_replay(at=state.seq)
        replayed.seq = state.seq
        has_snapshots = self._read(lambda r: r.snapshot_count(projection_version=PROJECTION_VERSION))
        if has_snapshots and state.seq:
            anomalies += snapshot_anomaly(state, replayed)
        anomalies += read_model_anomalies(view, View(replayed, view.best_rule))
        anomalies += protocol_anomalies(state)
        return LedgerHealth(seq=view.seq, store=store, anomalies=anomalies)
