"""The status words of the ledger, as ``str`` enums.

Each member *is* its string (``CheckpointStatus.COMMITTED == "committed"``, same hash,
``str()``/``format()``/JSON give the bare value), so code can name a status instead of
spelling it while every persisted or printed form stays byte-identical: the log's
``attempt.ended`` reason, projection snapshots and read-model rows (msgpack), the
read model's ``status`` column, ``inspect --json`` and ``audit --json``. Those spellings
are public (docs/contract.md); a member's value never changes, new members may be added.

Values read back from the log may be plain ``str`` (an ``attempt.ended`` reason is
whatever its writer recorded): compare with ``==`` or ``in``, never with ``is``.
"""

from __future__ import annotations

import enum
import sys

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10 has no enum.StrEnum

    class StrEnum(str, enum.Enum):
        """``enum.StrEnum`` of Python 3.11: ``str()`` and ``format()`` give the value, not ``Class.NAME``."""

        def __str__(self) -> str:
            return str.__str__(self)

        def __format__(self, spec: str) -> str:
            return str.__format__(self, spec)


class CheckpointStatus(StrEnum):
    """Where a checkpoint stands in the projection (``inspect --json`` ``checkpoints[].status``)."""

    IN_FLIGHT = "in_flight"
    """``checkpoint.started`` recorded, not yet committed or aborted (torn if its attempt is over)."""
    COMMITTED = "committed"
    """Every expected rank's shards recorded and ``checkpoint.committed``: the only loadable status."""
    ABORTED = "aborted"
    """``checkpoint.aborted``: it holds no weights and is never loaded."""
    DELETED = "deleted"
    """Deletion requested (blobs may still be being removed) or done: never loaded again."""
    CORRUPT = "corrupt"
    """``corruption.detected`` for one of its shards: never loaded again."""


class AttemptStatus(StrEnum):
    """How an attempt stands (``inspect --json`` ``attempts[].status``).

    Every value but ``running`` is an ``attempt.ended`` reason.
    """

    RUNNING = "running"
    """Begun and not ended (yet)."""
    COMPLETED = "completed"
    """Reached the run's step target and committed its final checkpoint."""
    PREEMPTED = "preempted"
    """Stopped by SIGTERM/SIGUSR1 after saving its state (exit 75: requeue me)."""
    FAILED = "failed"
    """Stopped by an error (or its last checkpoint failed)."""
    FENCED = "fenced"
    """A newer attempt took over the run; its later appends were refused."""
    CRASHED = "crashed"
    """Ended without ``attempt.ended`` (a newer attempt began), or recorded so by ``ckpt-ledger end-attempt``."""


class AnomalyKind(StrEnum):
    """What an :class:`ledger.Anomaly` of ``Ledger.health()`` is about."""

    INTEGRITY = "integrity"
    """The database's own integrity check failed."""
    SEQ_GAP = "seq_gap"
    """Sequence numbers are not contiguous from 1: events were removed outside ckpt-ledger."""
    FENCING = "fencing"
    """The stored fencing token is below an event's epoch."""
    TRAILING_GARBAGE = "trailing_garbage"
    """Bytes past the database's last page."""
    CREATION_LEFTOVER = "creation_leftover"
    """A half-created ledger file left by a crash during creation."""
    SNAPSHOT_MISMATCH = "snapshot_mismatch"
    """A projection snapshot disagrees with a full replay."""
    READ_MODEL_MISMATCH = "read_model_mismatch"
    """The read model disagrees with a full replay."""
    PROTOCOL = "protocol"
    """An event the fold kept as a protocol violation (a shard for an unknown checkpoint, ...)."""


class Severity(StrEnum):
    """How much an audit finding matters (``audit --json`` ``findings[].severity``)."""

    PROBLEM = "problem"
    """Something is wrong or left over, with a fix; makes ``audit`` exit 1."""
    NOTE = "note"
    """History worth knowing (a crash the run recovered from); ``audit`` still exits 0."""


#: The reasons ``attempt.ended`` records (every attempt status but ``running``), in the contract's order.
ATTEMPT_END_REASONS: tuple[str, ...] = tuple(s.value for s in AttemptStatus if s is not AttemptStatus.RUNNING)
