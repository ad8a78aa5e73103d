"""What the checkpoint code asks of the run's recorder, and the recorder of the ranks that record nothing.

Facts are born on every rank but recorded by one writer (rank 0's
:class:`~trainer.run_recorder.RunRecorder`). The training loop, the commit protocol and
the checkpoint manager run the same code on every rank; instead of branching on
"am I the writer?" at each fact, every rank holds a :class:`Recorder` and rank 0's is
the real one. The others hold a :class:`NullRecorder`, whose answers are the ones that
let rank 0 decide: it never vetoes a checkpoint, never knows of fencing (rank 0
broadcasts both), records nothing and opens nothing. A manager holds one too before
:meth:`~trainer.CheckpointManager.restore` opened the ledger and after it closed it.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from ledger import RetentionPolicy
from trainer.run_recorder import ShardFact


@runtime_checkable
class Recorder(Protocol):
    """The recording calls the checkpoint code makes on every rank (rank 0's recorder performs them)."""

    fenced_by: int | None
    """The epoch that fenced this attempt, once an append was refused; ``None`` while it owns the run."""

    def begin_attempt(self, *, world_size: int, stack: str, topology: dict[str, int], resumed_from: str | None,
                      slurm: dict[str, Any] | None, previous_topology: dict[str, Any] | None) -> int | None:
        """Record ``attempt.started`` (fencing older attempts); its epoch, or ``None`` where rank 0 tells it."""
        ...

    def report_corruption(self, checkpoint_id: str, location: str, expected: str | None, found: str | None) -> None:
        """Record a shard that failed verification."""
        ...

    def end_attempt(self, reason: str, last_step: int, *, signal_name: str | None = None) -> None:
        """Record how the attempt ended."""
        ...

    def step_completed(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer one ``step.completed``."""
        ...

    def flush_steps(self) -> None:
        """Append the buffered steps."""
        ...

    def metric(self, name: str, value: float, step: int, checkpoint_id: str | None) -> None:
        """Record one ``metric.recorded``."""
        ...

    def begin_checkpoint(self, checkpoint_id: str, step: int, world_size: int, stack: str,
                         topology: dict[str, int]) -> bool:
        """Phase 1 (``checkpoint.started``); ``False`` when this recorder learned the attempt is fenced."""
        ...

    def record_and_commit(self, checkpoint_id: str, shards: Sequence[ShardFact]) -> tuple[bool, bool]:
        """Phase 3: record the shards, then commit; ``(committed, shards_recorded)``."""
        ...

    def abort_checkpoint(self, checkpoint_id: str, reason: str) -> None:
        """Record ``checkpoint.aborted``."""
        ...

    def apply_retention(self, policy: RetentionPolicy) -> list[str]:
        """Run retention after a commit; the deleted checkpoint ids."""
        ...

    def close(self) -> None:
        """Release the ledger."""
        ...


class NullRecorder:
    """The :class:`Recorder` of a rank that records nothing (every rank but 0): no ledger, no files, no effect.

    Its answers are chosen so that rank 0 alone decides: :meth:`begin_checkpoint` allows
    the checkpoint and :attr:`fenced_by` stays ``None`` (whether the attempt is fenced
    reaches this rank by rank 0's broadcast, never from here).
    """

    fenced_by: int | None = None

    def begin_attempt(self, *, world_size: int, stack: str, topology: dict[str, int], resumed_from: str | None,
                      slurm: dict[str, Any] | None, previous_topology: dict[str, Any] | None) -> int | None:
        """Nothing to record: the epoch comes from rank 0 (``None``)."""
        return None

    def report_corruption(self, checkpoint_id: str, location: str, expected: str | None, found: str | None) -> None:
        """Nothing to record: rank 0 records what verification found."""

    def end_attempt(self, reason: str, last_step: int, *, signal_name: str | None = None) -> None:
        """Nothing to record: rank 0 records how the attempt ended."""

    def step_completed(self, step: int, metrics: dict[str, float]) -> None:
        """Nothing to record: rank 0's steps are the run's."""

    def flush_steps(self) -> None:
        """Nothing buffered."""

    def metric(self, name: str, value: float, step: int, checkpoint_id: str | None) -> None:
        """Nothing to record: rank 0's metric values are the run's."""

    def begin_checkpoint(self, checkpoint_id: str, step: int, world_size: int, stack: str,
                         topology: dict[str, int]) -> bool:
        """``True``: this rank has no say; rank 0's answer is broadcast to every rank."""
        return True

    def record_and_commit(self, checkpoint_id: str, shards: Sequence[ShardFact]) -> tuple[bool, bool]:
        """Never called: only rank 0 receives the shard reports and commits. Raises if it is."""
        raise RuntimeError(f"a rank that records nothing was asked to commit {checkpoint_id}; only rank 0 commits")

    def abort_checkpoint(self, checkpoint_id: str, reason: str) -> None:
        """Nothing to record: rank 0 records the abort."""

    def apply_retention(self, policy: RetentionPolicy) -> list[str]:
        """Nothing deleted: retention runs on rank 0."""
        return []

    def close(self) -> None:
        """Nothing to release."""
