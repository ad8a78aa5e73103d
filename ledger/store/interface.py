"""The typed store interface every ledger backend implements (SQLite today, PostgreSQL next).

``ledger/`` codes against :class:`LedgerStore` and :class:`StoreReader` only: no
connection, cursor or SQL crosses this line. A backend keeps these promises:

* **Contiguous seq.** Events are numbered 1, 2, 3, ... with no gap, in append order,
  and a stored event never changes. A seq visible to a reader stays visible.
* **Fencing.** Every append carries an ``epoch``. :meth:`LedgerStore.begin_epoch`
  raises the stored ``max_epoch`` by one and appends the event that starts it, in
  one transaction. An append with ``0 < epoch < max_epoch`` raises
  :class:`~ledger.errors.FencedError` and stores nothing; ``epoch > max_epoch``
  raises :class:`~ledger.errors.LedgerError` ("never begun"); epoch
  :data:`OPERATOR_EPOCH` (0) is never fenced. The check and the insert happen in
  the same transaction.
* **Idempotency by event_id.** ``event_id`` is unique. Appending an event whose id is
  already stored stores nothing and returns the original seq (no fence check: a
  retry of something that already landed succeeds even after being fenced).
* **Atomicity.** One append call (all its events, its read-model update) commits
  or rolls back as a whole.
* **Read consistency.** Everything read through one :class:`StoreReader` (one
  :meth:`LedgerStore.read` block) sees one committed prefix of the log together
  with the snapshots and read model committed with it.
* **Read-only stays read-only.** A store opened read-only never creates, changes or
  leaves behind a file, and works while a writer appends.
* **Lock-free reads may race.** A backend whose read-only mode reads without locks
  may raise :class:`ReadRaced` when its ``read()`` block ends; :func:`read_consistent`
  runs the block again.
* **Errors.** Backend errors leave the store as :class:`~ledger.errors.LedgerError`
  subclasses, translated in one place per backend.

Snapshots and the read model are caches of the pure fold
(:mod:`ledger.projection`): a backend stores and returns them verbatim and never
interprets them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Protocol, Sequence, TypeVar

from ledger.errors import LedgerError
from ledger.events import Event

T = TypeVar("T")

#: The epoch of appends made outside any attempt (CLI pin, gc): never fenced.
OPERATOR_EPOCH = 0


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One log entry: the envelope kept by the store plus the decoded event."""

    seq: int
    event_id: str
    epoch: int
    recorded_at: float
    tag: str
    schema_version: int
    event: Event


@dataclass(frozen=True, slots=True)
class EventChunk:
    """A run of consecutive stored events as columns (the replay fast path: no object per row)."""

    seqs: Sequence[int]
    epochs: Sequence[int]
    recorded_ats: Sequence[float]
    events: Sequence[Event]

    def __iter__(self) -> Iterator[Sequence]:  # unpacks as (seqs, epochs, recorded_ats, events)
        return iter((self.seqs, self.epochs, self.recorded_ats, self.events))


@dataclass(frozen=True, slots=True)
class StepRun:
    """Consecutive ``step.completed`` events (nothing else between them) as ``(seq, epoch, step)`` columns.

    What a fold needs of step events and nothing more: their metrics are not read. The
    columns are integer arrays (numpy) in seq order; epochs may differ within a run.
    """

    seqs: Sequence[int]
    epochs: Sequence[int]
    steps: Sequence[int]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A stored projection state (opaque bytes) covering events ``1..seq``."""

    seq: int
    projection_version: int
    state: bytes


@dataclass(frozen=True, slots=True)
class ReadModelRows:
    """The read model as of ``seq``: small keyed rows a reader looks up without folding.

    ``checkpoints`` and ``attempts`` map a key to an opaque encoded row plus the
    indexed columns a backend stores next to it; ``facts`` holds single values
    (resume target id, latest id, ...). All values are produced by the fold
    (:mod:`ledger.read_model`); the store never interprets them.
    """

    seq: int
    version: int
    facts: dict[str, bytes] = field(default_factory=dict)
    checkpoints: dict[str, "CheckpointRow"] = field(default_factory=dict)
    attempts: dict[int, bytes] = field(default_factory=dict)
    #: Keys whose rows are gone (e.g. a checkpoint dropped by a rebuild).
    removed_checkpoints: Sequence[str] = ()
    #: ``True``: this replaces the whole read model (a rebuild); ``False``: these rows change, the rest stay.
    full: bool = False


@dataclass(frozen=True, slots=True)
class CheckpointRow:
    """One checkpoint in the read model: indexed columns plus its encoded state."""

    started_seq: int
    step: int
    status: str
    state: bytes


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """Integrity facts of a store, checked without interpreting events (``ledger.health`` judges them)."""

    integrity: list[str]
    """The backend's own consistency check: ``["ok"]`` when healthy, else its messages."""
    events: int
    first_seq: int
    last_seq: int
    max_epoch: int
    """The stored fencing token."""
    newest_event_epoch: int
    trailing_bytes: int = 0
    """Unknown bytes after the end of the database file (0 when healthy or not applicable)."""
    details: dict[str, int] = field(default_factory=dict)
    """Backend facts worth printing next to a finding (page count, page size, ...)."""
    leftovers: list[str] = field(default_factory=list)
    """Paths of half-created ledger files a crash left behind (a writer open removes them)."""


#: Builds the event a checked append stores from the events already stored about its
#: checkpoint (read inside the append's transaction); raises to refuse the append.
MakeChecked = Callable[[Sequence[StoredEvent]], Event]


class ReadModelMaintainer(Protocol):
    """Keeps the read model in step with the log; the store calls it inside each append's transaction."""

    def advance(self, reader: "StoreReader", appended: EventChunk | None = None) -> ReadModelRows | None:
        """Fold what ``reader`` (the append's own transaction, new events included) holds past the
        maintainer's last seq; return the rows to write in that transaction (``None``: write nothing).

        ``appended``: the events this transaction inserted, as the store holds them already
        (a maintainer that is exactly one append behind folds them without reading them back)."""

    def discard(self) -> None:
        """The transaction rolled back: forget what the last :meth:`advance` folded."""


class StoreReader(Protocol):
    """One consistent read of a store (valid only inside its :meth:`LedgerStore.read` block)."""

    def max_seq(self) -> int:
        """The newest sequence number (0 for an empty log)."""

    def max_epoch(self) -> int:
        """The stored fencing token (the newest begun epoch; 0 before any attempt)."""

    def events(self, *, after: int = 0, until: int | None = None, tags: Sequence[str] | None = None,
               limit: int | None = None) -> Iterator[StoredEvent]:
        """Events with ``after < seq <= until`` (optionally only ``tags``), in seq order, at most ``limit``."""

    def chunks(self, *, after: int = 0, until: int | None = None) -> Iterator[EventChunk]:
        """Events with ``after < seq <= until`` as column chunks, in seq order (bounded memory)."""

    def replay_parts(self, *, after: int = 0, until: int | None = None) -> Iterator[EventChunk | StepRun]:
        """What a fold needs of events ``after < seq <= until``, in seq order (bounded memory).

        Like :meth:`chunks`, except that a backend may hand runs of ``step.completed``
        events over as :class:`StepRun` columns without decoding them (the bulk of a long
        log). Only for folding (:func:`ledger.projection.fold_chunks`); readers that show
        events use :meth:`events` or :meth:`chunks`.
        """

    def checkpoint_events(self, checkpoint_id: str) -> list[StoredEvent]:
        """Every event whose payload names ``checkpoint_id``, in seq order (indexed)."""

    def snapshot_seq(self, *, at_most: int, projection_version: int) -> int:
        """The seq of the newest snapshot covering at most ``at_most`` events (0 if none), without reading it."""

    def snapshot(self, *, at_most: int, projection_version: int) -> Snapshot | None:
        """The newest snapshot of that version covering at most ``at_most`` events."""

    def snapshot_count(self, *, projection_version: int) -> int:
        """How many snapshots of that version are stored."""

    def read_model_seq(self, *, version: int) -> int | None:
        """The seq the stored read model covers, ``None`` if it is missing or of another version."""

    def read_model_fact(self, key: str) -> bytes | None:
        """One fact of the read model (see :class:`ReadModelRows`)."""

    def read_model_checkpoint(self, checkpoint_id: str) -> bytes | None:
        """One checkpoint's encoded row, by id."""

    def read_model_checkpoints(self) -> list[bytes]:
        """Every checkpoint's encoded row, in start order."""

    def read_model_attempts(self) -> list[bytes]:
        """Every attempt's encoded row, oldest epoch first."""

    def health(self, *, thorough: bool = False) -> StoreHealth:
        """Integrity facts; ``thorough`` runs the slow full check."""


class LedgerStore(Protocol):
    """One process's handle on one run's event log (writer or read-only)."""

    location: str
    """Where the ledger lives, for messages (a file path, a URL without secrets)."""
    read_only: bool

    def read(self) -> ContextManager[StoreReader]:
        """One consistent read transaction (may raise :class:`ReadRaced` at its end: see :func:`read_consistent`)."""

    def append(self, events: Sequence[Event], *, epoch: int, event_ids: Sequence[str | None] | None = None,
               maintainer: ReadModelMaintainer | None = None) -> list[int]:
        """Append atomically (fenced, idempotent by ``event_ids``; ``None`` ids are minted); returns the seqs.

        A repeated id inside one call raises ``ValueError``. With ``maintainer``, its
        rows for the new events are written in the same transaction; an empty ``events``
        with a ``maintainer`` stores no event and only brings the read model up to the log
        (a writer's rebuild on open).
        """

    def append_checked(self, make: MakeChecked, *, checkpoint_id: str, epoch: int, event_id: str,
                       maintainer: ReadModelMaintainer | None = None) -> int:
        """Append the event ``make(events about checkpoint_id)`` returns, all in one transaction.

        Order inside the transaction: an already-stored ``event_id`` returns its seq
        (``make`` is not called); then the fence check; then ``make`` (which may raise
        to refuse: nothing is stored); then the insert and the read-model update.
        """

    def begin_epoch(self, make: Callable[[int], Event], *, event_id: str | None = None,
                    maintainer: ReadModelMaintainer | None = None) -> tuple[int, int]:
        """Raise ``max_epoch`` by one and append ``make(new_epoch)`` under it; returns ``(epoch, seq)``."""

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store a snapshot (keeping at least the newest two; older ones may be dropped)."""

    def write_read_model(self, rows: ReadModelRows) -> None:
        """Replace the read model (``rows.full``) or update it, in its own transaction (a rebuild)."""

    def close(self) -> None:
        """Release the backend's resources. Idempotent."""


class ReadRaced(LedgerError):
    """A lock-free read overlapped a writer and may have seen a torn state: read again."""


#: Tries of :func:`read_consistent` before giving up (each retry finds the writer's ``-wal`` and locks).
READ_TRIES = 5


def read_consistent(store: LedgerStore, fn: Callable[[StoreReader], T]) -> T:
    """``fn(reader)`` inside one :meth:`LedgerStore.read`, re-run if the read raced a writer."""
    for _ in range(READ_TRIES):
        try:
            with store.read() as reader:
                return fn(reader)
        except ReadRaced:
            continue
    raise LedgerError(f"{store.location}: ledger kept changing under a lock-free read; retry")
