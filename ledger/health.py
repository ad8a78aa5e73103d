"""``Ledger.health()``: what is wrong with a ledger itself, as typed :class:`Anomaly` values.

Two sources: the store's integrity facts (the database file, sequence numbers, the
fencing token, half-created files, caches that disagree with the log) and the
protocol violations the fold records (a shard for an unknown checkpoint, a commit
after an abort). ``audit`` turns them into findings; nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ledger.projection import State, encode_state
from ledger.statuses import AnomalyKind
from ledger.store import StoreHealth
from ledger.view import View


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One thing wrong with the ledger: ``seq`` is the event it points at (``None`` for the file as a whole)."""

    seq: int | None
    kind: AnomalyKind
    """What is wrong (the fold's protocol violations have kind ``protocol``)."""
    message: str


@dataclass(frozen=True, slots=True)
class LedgerHealth:
    """The result of :meth:`ledger.Ledger.health`."""

    seq: int
    """The newest sequence number when checked."""
    store: StoreHealth
    anomalies: list[Anomaly] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.anomalies


def protocol_anomalies(state: State) -> list[Anomaly]:
    """The fold's recorded protocol violations (stored as ``"seq N: message"``) as typed anomalies."""
    found = []
    for text in state.anomalies:
        head, _, rest = text.partition(": ")
        seq = int(head[4:]) if head.startswith("seq ") and head[4:].isdigit() else None
        found.append(Anomaly(seq, AnomalyKind.PROTOCOL, rest if seq is not None else text))
    return found


def store_anomalies(store: StoreHealth, path: str) -> list[Anomaly]:
    """Judge the store's integrity facts."""
    found = []
    if store.integrity != ["ok"]:
        found.append(Anomaly(None, AnomalyKind.INTEGRITY,
                             f"database check failed: {'; '.join(store.integrity[:3])}"))
    if store.events != store.last_seq or (store.events and store.first_seq != 1):
        found.append(Anomaly(None, AnomalyKind.SEQ_GAP,
                             f"{store.events} events but sequence numbers run {store.first_seq}..{store.last_seq}: "
                             "events were removed outside ckpt-ledger"))
    if store.max_epoch < store.newest_event_epoch:
        found.append(Anomaly(None, AnomalyKind.FENCING,
                             f"stored max_epoch {store.max_epoch} is below the newest event epoch "
                             f"{store.newest_event_epoch}: fencing cannot stop a zombie attempt"))
    if store.trailing_bytes:
        pages = store.details.get("page_count", "?")
        size = store.details.get("page_size", "?")
        found.append(Anomaly(None, AnomalyKind.TRAILING_GARBAGE,
                             f"{store.trailing_bytes} bytes past the database's last page "
                             f"({pages} pages x {size}): something appended to {path}; writers refuse it"))
    for leftover in store.leftovers:
        found.append(Anomaly(None, AnomalyKind.CREATION_LEFTOVER,
                             f"{leftover} is a half-created ledger left by a crash during creation; "
                             "the next writer open removes it"))
    return found


def snapshot_anomaly(projected: State, replayed: State) -> list[Anomaly]:
    """A snapshot-based projection that differs from a full replay of the same prefix."""
    if encode_state(projected) == encode_state(replayed):
        return []
    return [Anomaly(projected.seq, AnomalyKind.SNAPSHOT_MISMATCH,
                    "the stored projection snapshot disagrees with a full replay of the log")]


def view_facts(view: View) -> dict[str, Any]:
    """What a view answers, as comparable plain data (read model vs replay)."""
    best = view.best
    return {
        "seq": view.seq,
        "run": view.run,
        "resume": view.resume,
        "latest": view.latest,
        "best": None if best is None else (best.checkpoint, best.metric, best.value),
        "last_step": view.last_step,
        "goodput": view.goodput,
        "checkpoints": view.checkpoints,
        "attempts": view.attempts,
    }


def read_model_anomalies(view: View, replayed: View) -> list[Anomaly]:
    """Where a view (possibly answered by the read model) disagrees with a view of a full replay."""
    ours, truth = view_facts(view), view_facts(replayed)
    wrong = [name for name in truth if ours[name] != truth[name]]
    if not wrong:
        return []
    return [Anomaly(view.seq, AnomalyKind.READ_MODEL_MISMATCH,
                    f"the read model disagrees with a full replay of the log on {', '.join(wrong)}; "
                    "a writer open rebuilds it only when it is missing or behind")]
