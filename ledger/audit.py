"""Post-mortem checks of a run: what crashed, what was left half-done, what is missing or damaged.

:func:`audit` reads the ledger (through whatever connection the :class:`Ledger`
holds; a read-only one changes nothing) and the blob files, and returns an
:class:`AuditReport` of findings. A finding is a *problem* (something is wrong
or left over and there is something to do: each says what) or a *note* (history
worth knowing, such as a crashed attempt the run already recovered from).

Nothing here writes. Listing the blob directory is used to find garbage only.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ledger import decisions
from ledger.blobs import parse_location
from ledger.errors import CorruptBlobError
from ledger.garbage import may_be_in_progress, stray_files, stray_uploads
from ledger.health import Anomaly
from ledger.projection import CheckpointState, State
from ledger.statuses import AnomalyKind, AttemptStatus, CheckpointStatus, Severity

if TYPE_CHECKING:
    from ledger.ledger import Ledger

#: Shorthands: most lines below construct a finding.
PROBLEM, NOTE = Severity.PROBLEM, Severity.NOTE


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing audit found."""

    kind: str
    """Stable machine name, e.g. ``torn_checkpoint``, ``missing_shard``, ``stray_file``."""
    severity: Severity
    """``problem`` (makes ``audit`` exit 1) or ``note``."""
    subject: str
    """What it is about: a checkpoint id, a blob location, ``attempt 3``, the ledger file."""
    message: str
    fix: str | None = None
    """What to do about it (problems always say)."""
    seq: int | None = None
    """The log sequence number it points at, when there is one."""


@dataclass(slots=True)
class AuditReport:
    """Every finding of one audit, plus what was checked."""

    run_dir: str
    seq: int
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == PROBLEM]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == NOTE]

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """The JSON form printed by ``ckpt-ledger audit --json``."""
        return {
            "run_dir": self.run_dir,
            "seq": self.seq,
            "healthy": self.healthy,
            "problems": len(self.problems),
            "notes": len(self.notes),
            "checked": dict(self.checked),
            "findings": [asdict(f) for f in self.findings],
        }


#: ``progress(done_bytes, total_bytes)`` after each shard is re-hashed.
Progress = Callable[[int, int], None]


def local_process_alive(host: str, pid: int) -> bool | None:
    """Whether ``pid`` runs on ``host`` — ``None`` when that cannot be told from here (another host)."""
    if not pid or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def audit(led: "Ledger", *, verify_blobs: bool = False, progress: Progress | None = None,
          process_alive: Callable[[str, int], bool | None] = local_process_alive) -> AuditReport:
    """Check a run's ledger and blobs; never changes either.

    ``verify_blobs`` re-hashes every shard of every committed checkpoint (slow on
    big runs); otherwise shards are checked for presence and size only.
    ``process_alive`` tells whether an attempt's process still runs (used only to
    word a finding, never to decide anything).
    """
    listing = list(led.blobs.list_files())  # before projecting, as gc does
    uploads = led.blobs.unfinished_uploads()
    findings: list[Finding] = []
    health = led.health(thorough=verify_blobs)
    view = led.projection(at=health.seq)
    state = view.state
    report = AuditReport(run_dir=str(led.run_dir), seq=view.seq, findings=findings)
    findings += [_health_finding(led, anomaly) for anomaly in health.anomalies]
    if view.seq == 0:
        findings.append(Finding("empty_ledger", NOTE, led.path.name, "the ledger has no events yet"))
    findings += _attempts(led, state, process_alive)
    findings += _checkpoints(led, state, verify_blobs, progress, report.checked)
    for stray in stray_files(state, listing) + stray_uploads(state, uploads):
        findings.append(Finding("stray_upload" if stray.upload else "stray_file", PROBLEM, stray.location,
                                stray.reason, f"`ckpt-ledger gc {led.run_dir}` {'aborts' if stray.upload else 'removes'} it"))
    live = [loc for loc in listing if may_be_in_progress(state, *_blob_owner(loc))]
    if live:
        findings.append(Finding("files_in_progress", NOTE, "blobs", f"{len(live)} file(s) belong to saves still in "
                                "progress and were not judged"))
    report.checked.update(attempts=len(state.attempts), checkpoints=len(state.checkpoints), files=len(listing),
                          events=view.seq)
    return report


def _blob_owner(location: str) -> tuple[str | None, int | None]:
    parsed = parse_location(location)
    return (parsed.checkpoint_id, parsed.epoch) if parsed else (None, None)


# -- the database file ---------------------------------------------------------------------------

#: What to do about each kind of ledger anomaly (audit's ``fix``), and the finding kind it reports as.
_FIXES = {
    AnomalyKind.INTEGRITY: (
        "integrity", "stop writers, copy the run directory, then recover with `sqlite3 ledger.db .recover`"),
    AnomalyKind.SEQ_GAP: ("seq_gap", "restore ledger.db from a backup; the log must never be edited"),
    AnomalyKind.FENCING: ("fencing", "restore ledger.db from a backup"),
    AnomalyKind.SNAPSHOT_MISMATCH: (
        "snapshot_mismatch",
        "decisions may be wrong until the snapshot is replaced; report this with the ledger attached"),
    AnomalyKind.READ_MODEL_MISMATCH: (
        "read_model_mismatch",
        "decisions read from the read model may be wrong; report this with the ledger attached"),
    AnomalyKind.PROTOCOL: (
        "anomaly",
        "a writer broke the checkpoint protocol here; report it with `ckpt-ledger replay` output around this seq"),
}


def _health_finding(led: "Ledger", anomaly: Anomaly) -> Finding:
    name = led.path.name
    if anomaly.kind == AnomalyKind.TRAILING_GARBAGE:
        garbage = int(anomaly.message.split(" ", 1)[0])
        size = led.path.stat().st_size
        return Finding("trailing_garbage", PROBLEM, name, anomaly.message,
                       f"back it up, then `truncate -s {size - garbage} {led.path}`")
    if anomaly.kind == AnomalyKind.CREATION_LEFTOVER:
        return Finding("creation_leftover", PROBLEM, anomaly.message.split(" ", 1)[0], anomaly.message,
                       "open the run for writing once (any `ckpt-ledger train`/`gc`/`pin`), or delete the file")
    kind, fix = _FIXES.get(anomaly.kind, (anomaly.kind, "report this with the ledger attached"))
    protocol = anomaly.kind == AnomalyKind.PROTOCOL
    message = f"seq {anomaly.seq}: {anomaly.message}" if protocol and anomaly.seq is not None else anomaly.message
    return Finding(kind, PROBLEM, "log" if protocol else name, message, fix, seq=anomaly.seq)


# -- attempts -------------------------------------------------------------------------------------

def _last_event(led: "Ledger", seq: int) -> str:
    stored = led.event_at(seq)
    if stored is None:
        return f"seq {seq}"
    detail = ""
    for name in ("checkpoint_id", "step"):
        value = getattr(stored.event, name, None)
        if value is not None:
            detail += f" {name}={value}"
    return f"seq {seq} {stored.tag}{detail}"


def _rank_progress(ckpt: CheckpointState) -> str:
    recorded = {s.rank for s in ckpt.shards}
    parts = [f"rank {r}: {'shard recorded' if r in recorded else 'nothing recorded'}" for r in ckpt.ranks]
    return "; ".join(parts)


def _attempts(led: "Ledger", state: State, process_alive: Callable[[str, int], bool | None]) -> list[Finding]:
    found = []
    unfinished = {}
    for ckpt in state.checkpoints.values():
        if ckpt.status == CheckpointStatus.IN_FLIGHT:
            unfinished.setdefault(ckpt.epoch, []).append(ckpt)
    for attempt in sorted(state.attempts.values(), key=lambda a: a.epoch):
        who = f"attempt {attempt.epoch}" + (f" (job {attempt.job_id})" if attempt.job_id else "")
        saves = "".join(f"; save {c.checkpoint_id} at step {c.step} never committed ({_rank_progress(c)})"
                        for c in unfinished.get(attempt.epoch, []))
        if attempt.status == AttemptStatus.CRASHED and attempt.ended_seq is not None:
            found.append(Finding("crashed_attempt", NOTE, f"attempt {attempt.epoch}",
                                 f"{who} was recorded as crashed by an operator (`ckpt-ledger end-attempt`) at step "
                                 f"{attempt.last_step}{saves}", seq=attempt.ended_seq))
        elif attempt.status == AttemptStatus.CRASHED:
            found.append(Finding("crashed_attempt", NOTE, f"attempt {attempt.epoch}",
                                 f"{who} ended without attempt.ended (crashed or killed); last event "
                                 f"{_last_event(led, attempt.last_seq)}, last step {attempt.last_step}{saves}",
                                 seq=attempt.last_seq))
        elif attempt.status == AttemptStatus.RUNNING:
            alive = process_alive(attempt.host, attempt.pid)
            last = _last_event(led, attempt.last_seq)
            if alive is False:
                target = decisions.resume_target(state)
                found.append(Finding(
                    "dead_attempt", PROBLEM, f"attempt {attempt.epoch}",
                    f"{who} has no attempt.ended but its process {attempt.pid} on {attempt.host} is gone: it crashed; "
                    f"last event {last}{saves}",
                    "restart the job (it resumes from "
                    f"{target.checkpoint_id if target else 'scratch'} and fences this attempt), or record it with "
                    f"`ckpt-ledger end-attempt {led.run_dir} {attempt.epoch} --reason crashed`; then "
                    "`ckpt-ledger gc` removes its unfinished save", seq=attempt.last_seq))
            else:
                found.append(Finding("running_attempt", NOTE, f"attempt {attempt.epoch}",
                                     f"{who} has not ended yet (still running, or crashed with no restart since); "
                                     f"last event {last}{saves}", seq=attempt.last_seq))
        elif attempt.status == AttemptStatus.FENCED:
            by = f" by epoch {attempt.fenced_by}" if attempt.fenced_by else ""
            found.append(Finding("fenced_attempt", NOTE, f"attempt {attempt.epoch}",
                                 f"{who} was fenced{by} at step {attempt.last_step}: a newer attempt took over the run "
                                 f"and its later appends were refused{saves}", seq=attempt.ended_seq))
        elif attempt.status == AttemptStatus.FAILED:
            found.append(Finding(f"{attempt.status}_attempt", NOTE, f"attempt {attempt.epoch}",
                                 f"{who} ended {attempt.status} at step {attempt.last_step}", seq=attempt.ended_seq))
    return found


# -- checkpoints and their files ------------------------------------------------------------------

def _checkpoints(led: "Ledger", state: State, verify_blobs: bool, progress: Progress | None,
                 checked: dict[str, int]) -> list[Finding]:
    found = []
    gc_fix = f"`ckpt-ledger gc {led.run_dir}` removes it"
    to_hash: list[tuple[CheckpointState, Any]] = []
    for ckpt in state.checkpoints.values():
        cid = ckpt.checkpoint_id
        present = [s for s in ckpt.shards if led.blobs.size(s.location) is not None]
        if decisions.is_torn(state, ckpt):
            found.append(Finding("torn_checkpoint", PROBLEM, cid,
                                 f"save at step {ckpt.step} by attempt {ckpt.epoch} was never committed and never will "
                                 f"be ({_rank_progress(ckpt)}); {len(present)} recorded file(s) still on disk",
                                 gc_fix, seq=ckpt.started_seq))
        elif ckpt.status == CheckpointStatus.IN_FLIGHT:
            found.append(Finding("in_flight_checkpoint", NOTE, cid,
                                 f"save at step {ckpt.step} is in progress ({_rank_progress(ckpt)})", seq=ckpt.started_seq))
        elif ckpt.status == CheckpointStatus.ABORTED and present:
            found.append(Finding("aborted_files", PROBLEM, cid,
                                 f"aborted save ({ckpt.abort_reason or 'no reason'}) still has {len(present)} "
                                 "file(s) on disk", gc_fix, seq=ckpt.started_seq))
        elif ckpt.deletion_requested and ckpt.status != CheckpointStatus.DELETED:
            found.append(Finding("interrupted_deletion", PROBLEM, cid,
                                 f"deletion ({ckpt.deletion_reason or 'no reason'}) was requested but never finished; "
                                 f"{len(present)} file(s) remain", f"`ckpt-ledger gc {led.run_dir}` finishes it"))
        elif ckpt.status == CheckpointStatus.CORRUPT:
            found.append(Finding("corrupt_checkpoint", NOTE, cid,
                                 f"corruption.detected recorded for {', '.join(ckpt.corrupt_locations)}; it is never "
                                 "loaded again", seq=ckpt.started_seq))
        elif ckpt.status == CheckpointStatus.COMMITTED:
            found += _committed_files(led, state, ckpt)
            to_hash += [(ckpt, s) for s in ckpt.shards]
    checked["shards"] = len(to_hash)
    if verify_blobs:
        found += _verify_hashes(led, state, to_hash, progress, checked)
    return found


def _fallback(state: State, ckpt: CheckpointState) -> str:
    others = [c for c in decisions.resume_candidates(state) if c.checkpoint_id != ckpt.checkpoint_id]
    target = decisions.resume_target(state)
    if target is None or target.checkpoint_id != ckpt.checkpoint_id:
        return "it is not the resume target"
    return (f"it IS the resume target: the next restart records corruption.detected and falls back to "
            f"{others[0].checkpoint_id if others else 'scratch'}")


def _committed_files(led: "Ledger", state: State, ckpt: CheckpointState) -> list[Finding]:
    found = []
    for shard in ckpt.shards:
        size = led.blobs.size(shard.location)
        if size is None:
            found.append(Finding("missing_shard", PROBLEM, shard.location,
                                 f"committed checkpoint {ckpt.checkpoint_id} (step {ckpt.step}) lost rank {shard.rank}'s "
                                 "shard file", f"restore the file from a backup; {_fallback(state, ckpt)}",
                                 seq=ckpt.committed_seq))
        elif size != shard.bytes:
            found.append(Finding("size_mismatch", PROBLEM, shard.location,
                                 f"committed checkpoint {ckpt.checkpoint_id}: file has {size} bytes, the ledger recorded "
                                 f"{shard.bytes}", f"restore the file from a backup; {_fallback(state, ckpt)}",
                                 seq=ckpt.committed_seq))
    return found


def _verify_hashes(led: "Ledger", state: State, shards: list[tuple[CheckpointState, Any]],
                   progress: Progress | None, checked: dict[str, int]) -> list[Finding]:
    found = []
    total = sum(s.bytes for _, s in shards)
    done = 0
    for ckpt, shard in shards:
        size = led.blobs.size(shard.location)
        if size == shard.bytes:  # missing or resized files were reported already
            def hashed(count: int, base: int = done) -> None:
                if progress is not None:
                    progress(base + count, total)

            try:
                led.blobs.verify(shard.location, shard.hash, shard.bytes, progress=hashed)
            except CorruptBlobError as err:
                if err.found_hash is None:  # the recorded hash names no algorithm it could be checked with
                    found.append(Finding("hash_mismatch", PROBLEM, shard.location,
                                         f"committed checkpoint {ckpt.checkpoint_id}: {err}",
                                         "the recorded hash cannot be checked; treat the checkpoint as unverified",
                                         seq=ckpt.committed_seq))
                else:
                    found.append(Finding("hash_mismatch", PROBLEM, shard.location,
                                         f"committed checkpoint {ckpt.checkpoint_id}: content hash {err.found_hash} "
                                         f"does not match the recorded {shard.hash}",
                                         f"restore the file from a backup; {_fallback(state, ckpt)}",
                                         seq=ckpt.committed_seq))
        done += shard.bytes
        if progress is not None:
            progress(done, total)
    checked["bytes_hashed"] = done
    return found

