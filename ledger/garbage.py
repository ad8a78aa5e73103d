"""Garbage collection of a run directory: retention, plus files no live checkpoint owns.

Two kinds of garbage, both decided from the log:

* checkpoints retention removes (:func:`ledger.retention.plan`: the policy, torn
  and aborted saves, interrupted deletions) — carried out through
  :meth:`Ledger.apply_retention`, which records each deletion in the log;
* *stray files*: files under the blob root that no ``shard.written`` of a
  surviving checkpoint records — temp files of interrupted writes, unrecorded
  files of torn saves, leftovers of deleted checkpoints.

Listing the blob directory is how stray files are *found*; it never decides what
to resume or keep. A file that may belong to a save still in progress (its
attempt has not ended and its checkpoint is not finished) is never a stray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from ledger import retention
from ledger.blobs import parse_location
from ledger.projection import State

if TYPE_CHECKING:
    from ledger.blobs import BlobStore
    from ledger.ledger import Ledger
    from ledger.view import View



@dataclass(frozen=True, slots=True)
class StrayFile:
    """A file under the blob root that nothing in the log keeps, and why it is garbage."""

    location: str
    checkpoint_id: str | None
    reason: str
    upload: bool = False
    """An unfinished multipart upload (invisible, but holding storage): gc aborts it."""


def _is_temp(location: str) -> bool:
    name = location.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(".tmp")


def may_be_in_progress(state: State, checkpoint_id: str | None, epoch: int | None) -> bool:
    """Whether a file in ``blobs/<checkpoint_id>/e<epoch>/`` could still be written by a live attempt.

    True when the epoch's attempt has not ended (or is newer than this state knows)
    and the checkpoint is unknown or still in flight.
    """
    if epoch is None:
        return False
    if epoch > state.current_epoch:
        return True
    attempt = state.attempts.get(epoch)
    if attempt is None or attempt.status != "running" or epoch < state.current_epoch:
        return False
    ckpt = state.checkpoints.get(checkpoint_id) if checkpoint_id is not None else None
    return ckpt is None or ckpt.status == "in_flight"


def stray_files(state: State, listing: Iterable[str]) -> list[StrayFile]:
    """The files of ``listing`` (blob locations) that are garbage according to ``state``. Pure.

    List the files *before* projecting ``state``: a file written after the listing
    is then never judged against an older state.
    """
    owner = {}
    for ckpt in state.checkpoints.values():
        for shard in ckpt.shards:
            owner[shard.location] = ckpt
    strays = []
    for location in sorted(listing):
        match = parse_location(location)
        cid = match.checkpoint_id if match else None
        epoch = match.epoch if match else None
        recorded = owner.get(location)
        if recorded is not None:
            if recorded.status == "deleted":
                strays.append(StrayFile(location, recorded.checkpoint_id,
                                        f"left behind by deleted checkpoint {recorded.checkpoint_id}"))
            continue  # a recorded shard of a surviving checkpoint: retention decides its fate
        if may_be_in_progress(state, cid, epoch):
            continue
        ckpt = state.checkpoints.get(cid) if cid is not None else None
        if match is None:
            reason = "not inside any checkpoint directory"
        elif _is_temp(location):
            reason = f"temp file of an interrupted write (attempt {epoch})"
        elif ckpt is None:
            reason = f"no checkpoint {cid} was ever started in the ledger"
        elif ckpt.status == "in_flight":
            reason = f"unrecorded file of torn save {cid} (attempt {ckpt.epoch} is over)"
        else:
            reason = f"never recorded by a shard.written of {ckpt.status} checkpoint {cid}"
        strays.append(StrayFile(location, cid, reason))
    return strays


def stray_uploads(state: State, uploads: Iterable[str]) -> list[StrayFile]:
    """The unfinished uploads (their locations) that no live save may still complete. Pure.

    An upload is never visible as a blob, so nothing recorded can depend on it: once its
    attempt is over (or its checkpoint ended), it is the leftover of a killed writer.
    """
    strays = []
    for location in sorted(set(uploads)):
        match = parse_location(location)
        cid = match.checkpoint_id if match else None
        if may_be_in_progress(state, cid, match.epoch if match else None):
            continue
        strays.append(StrayFile(location, cid, f"unfinished upload of a writer that stopped"
                                f"{f' (attempt {match.epoch})' if match else ''}; never visible", upload=True))
    return strays


@dataclass(frozen=True, slots=True)
class GcPlan:
    """Everything one ``gc`` would remove, and why."""

    policy: retention.RetentionPolicy
    deletions: list[retention.Deletion]
    strays: list[StrayFile]
    seq: int
    """The log sequence number the plan was made at."""

    @property
    def empty(self) -> bool:
        return not self.deletions and not self.strays


def plan_gc(led: "Ledger", policy: retention.RetentionPolicy) -> GcPlan:
    """Plan a gc of ``led``'s run (works on a read-only ledger; changes nothing)."""
    listing = list(led.blobs.list_files())  # before projecting: see stray_files
    uploads = led.blobs.unfinished_uploads()
    view = led.projection()
    return GcPlan(policy=policy, deletions=retention.plan(view.state, policy, view.best_rule, now=time.time()),
                  strays=stray_files(view.state, listing) + stray_uploads(view.state, uploads),
                  seq=view.seq)


@dataclass(frozen=True, slots=True)
class GcResult:
    """What a gc did."""

    deletions: list[retention.Deletion]
    removed: list[StrayFile]


def execute_gc(led: "Ledger", plan: GcPlan) -> GcResult:
    """Carry out ``plan`` as an operator write: retention (recorded in the log), then stray files.

    Retention re-plans at execution time from the same policy, so a pin or a late
    metric that arrived after ``plan`` was made is still honoured.
    """
    deleted = led.apply_retention(plan.policy, epoch=None) if plan.deletions else []
    for stray in plan.strays:
        if stray.upload:
            led.blobs.abort_uploads(stray.location)
        else:
            led.blobs.delete(stray.location)
    return GcResult(deletions=deleted, removed=list(plan.strays))


def _epoch_of(location: str) -> int | None:
    parsed = parse_location(location)
    return parsed.epoch if parsed is not None else None


def retention_pass(led: "Ledger", policy: retention.RetentionPolicy, *, epoch: int,
                   sweep_strays: bool = True) -> GcResult:
    """An attempt's retention pass after a commit: the policy, plus what older attempts left behind.

    Torn and aborted saves are deleted even with no policy set, and (``sweep_strays``) stray
    files under the directories of *older* epochs are removed (:func:`sweep_older_epochs`):
    a run does not wait for an operator's ``gc`` to be clean. Files of this attempt's own
    epoch are never touched here.

    The trainer passes ``sweep_strays=False``: listing a whole blob store costs O(files) and,
    on a remote store, may wait on a slow or unreachable listing, so it sweeps once per
    attempt, off the commit path (``trainer.older_epoch_sweep``); ``gc`` collects anything later.
    """
    deleted = led.apply_retention(policy, epoch=epoch)
    if not sweep_strays:
        return GcResult(deletions=deleted, removed=[])
    return GcResult(deletions=deleted, removed=sweep_older_epochs(led.blobs, led.projection, epoch=epoch))


def sweep_older_epochs(blobs: "BlobStore", project: Callable[[], "View"], *, epoch: int,
                       keep_going: Callable[[], bool] = lambda: True) -> list[StrayFile]:
    """Remove the stray files under the directories of epochs older than ``epoch``; returns them.

    A fenced job's unrecorded files, a dead attempt's temp files and leftovers of deleted
    checkpoints: nothing recorded refers to them, and their attempts can no longer record
    anything. The listing is taken before the projection that judges it (``project()``, e.g.
    ``Ledger.projection``), as in :func:`plan_gc`. ``keep_going()`` is asked before each delete
    (a caller that stops waiting can stop the sweep). Store errors — a listing or delete past
    the store's housekeeping deadline — propagate: what is left stays for the next sweep or ``gc``.
    """
    listing = [loc for loc in blobs.list_files() if (e := _epoch_of(loc)) is not None and e < epoch]
    if not listing:
        return []
    strays = stray_files(project().state, listing)
    removed = []
    for stray in strays:
        if not keep_going():
            break
        blobs.delete(stray.location)
        removed.append(stray)
    return removed
