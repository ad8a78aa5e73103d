"""The read model: small keyed rows derived from the fold, kept current inside every append's transaction.

A cold ``Ledger.open(run, read_only=True).projection().resume`` would otherwise decode
the whole projected state (every checkpoint, attempt and metric) to answer one
question. Instead each append also writes, in the same transaction:

* one row per checkpoint touched by the new events (its :class:`CheckpointState`),
* one row per attempt touched,
* facts: the run, a summary (seq, last step, goodput, the best rule) and the ids the
  decisions picked — resume target, latest, best — plus the aliases.

Every value is computed from the folded :class:`State` by the same functions every
other reader uses (:class:`~ledger.view.View` over :mod:`ledger.decisions`): the
fold stays the definition, and a property test checks read model == full replay at
every prefix. A read model that is missing, of another :data:`READ_MODEL_VERSION`,
or behind the log (an older ckpt-ledger appended) is never used: readers fold
instead, and a writer rebuilds it when it opens.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

import msgspec

from ledger.decisions import BestRule
from ledger.projection import (
    PROJECTION_VERSION,
    AttemptState,
    CheckpointState,
    RunInfo,
    State,
    decode_state,
    encode_state,
    fold_chunks,
)
from ledger.store import CheckpointRow, EventChunk, ReadModelRows, StoreReader
from ledger.view import BestCheckpoint, View

#: Bump when the rows or facts change meaning; a different version is ignored and rebuilt.
READ_MODEL_VERSION = PROJECTION_VERSION * 1000 + 1

#: Events that change no checkpoint row and no decision (only the attempt that sent them and the summary).
_DECISION_NEUTRAL = frozenset({"step.completed", "preemption.signalled"})
#: Events whose fold touches only the checkpoint they name (plus decisions and the sender's attempt row).
_CHECKPOINT_LOCAL = frozenset({
    "checkpoint.started", "shard.written", "checkpoint.committed", "checkpoint.aborted", "metric.recorded",
    "alias.promoted", "alias.removed", "checkpoint.pinned", "checkpoint.unpinned", "checkpoint.deletion_requested",
    "checkpoint.deleted", "corruption.detected",
})


class Summary(msgspec.Struct, kw_only=True):
    """The run-level facts a view answers without the state."""

    seq: int
    last_step: int | None
    goodput: float
    best_metric: str
    best_mode: str
    resume: str | None
    latest: str | None
    best: str | None
    best_value: float | None
    aliases: dict[str, str]
    anomalies: int


_encode = msgspec.msgpack.Encoder().encode
_summary = msgspec.msgpack.Decoder(Summary)
_run = msgspec.msgpack.Decoder(RunInfo | None)
_checkpoint = msgspec.msgpack.Decoder(CheckpointState)
_attempt = msgspec.msgpack.Decoder(AttemptState)


def summarize(state: State, previous: Summary | None = None) -> Summary:
    """The summary facts of a state, decided by :class:`View` (the same code every reader uses).

    ``previous``: the summary of this state just before a decision-neutral batch
    (:data:`_DECISION_NEUTRAL`): its decisions are kept instead of recomputed, which is
    what keeps a per-step append O(1) in the number of checkpoints.
    """
    view = View(state)
    if previous is not None:
        return msgspec.structs.replace(previous, seq=state.seq, last_step=view.last_step, goodput=view.goodput,
                                       anomalies=len(state.anomalies))
    resume, latest, best = view.resume, view.latest, view.best
    return Summary(
        seq=state.seq, last_step=view.last_step, goodput=view.goodput, best_metric=view.best_rule.metric,
        best_mode=view.best_rule.mode, resume=resume.checkpoint_id if resume else None,
        latest=latest.checkpoint_id if latest else None, best=best.checkpoint_id if best else None,
        best_value=best.value if best else None, aliases=dict(state.aliases), anomalies=len(state.anomalies),
    )


def load_state(reader: StoreReader, at: int) -> State:
    """The fold of events ``1..at``: the newest usable snapshot, then the tail."""
    snap = reader.snapshot(at_most=at, projection_version=PROJECTION_VERSION)
    state = decode_state(snap.state) if snap is not None else State()
    state = fold_chunks(reader.replay_parts(after=snap.seq if snap is not None else 0, until=at), state)
    state.seq = at
    return state


def _checkpoint_row(ckpt: CheckpointState) -> CheckpointRow:
    # The column holds the status's spelling as a plain str: no database driver has to adapt an enum.
    return CheckpointRow(started_seq=ckpt.started_seq, step=ckpt.step, status=str(ckpt.status), state=_encode(ckpt))


def full_rows(state: State) -> ReadModelRows:
    """The whole read model of ``state`` (a rebuild)."""
    return ReadModelRows(
        seq=state.seq, version=READ_MODEL_VERSION, full=True,
        facts={"summary": _encode(summarize(state)), "run": _encode(state.run)},
        checkpoints={cid: _checkpoint_row(c) for cid, c in View(state).checkpoints.items()},
        attempts={a.epoch: _encode(a) for a in View(state).attempts},
    )


class ReadModelFolder:
    """Folds each append's new events into a live state and says which rows changed.

    The store calls :meth:`advance` inside the append's transaction (see
    :class:`ledger.store.ReadModelMaintainer`), so the rows commit with the events.
    """

    def __init__(self) -> None:
        self.state: State | None = None
        self._summary: Summary | None = None  # of ``state``, when written by this folder
        # A trainer appends from a background thread while its main thread reads views.
        self._lock = threading.Lock()

    def discard(self) -> None:
        with self._lock:
            self.state = None  # the fold ran ahead of a rolled-back transaction: reload next time
            self._summary = None

    def encoded_at(self, seq: int) -> bytes | None:
        """The live state, encoded, if it is exactly at ``seq`` (for a snapshot or a private copy)."""
        with self._lock:
            if self.state is None or self.state.seq != seq:
                return None
            return encode_state(self.state)

    def copy_at(self, seq: int) -> State | None:
        """A private copy of the live state if it is exactly at ``seq``."""
        data = self.encoded_at(seq)
        return decode_state(data) if data is not None else None

    def advance(self, reader: StoreReader, appended: EventChunk | None = None) -> ReadModelRows | None:
        with self._lock:
            return self._advance(reader, appended)

    def _advance(self, reader: StoreReader, appended: EventChunk | None) -> ReadModelRows | None:
        newest = reader.max_seq()
        stored = reader.read_model_seq(version=READ_MODEL_VERSION)
        if stored is None or stored > newest:  # missing, another version, or not of this log: rebuild
            self.state, self._summary = load_state(reader, newest), None
            return full_rows(self.state)
        if self.state is None or self.state.seq > stored:
            self.state, self._summary = load_state(reader, stored), None
        elif self.state.seq < stored:  # another writer appended (and kept the read model) since our last append
            self.state = fold_chunks(reader.replay_parts(after=self.state.seq, until=stored), self.state)
            self.state.seq, self._summary = stored, None
        if stored == newest:
            return None
        tags: set[str] = set()
        touched: set[str] = set()
        epochs: set[int] = set()
        chunks: Iterable[EventChunk]
        if appended is not None and appended.seqs and appended.seqs[0] == stored + 1 and appended.seqs[-1] == newest:
            chunks = [appended]  # exactly this transaction's events: no need to read them back
        else:
            chunks = reader.chunks(after=stored, until=newest)
        for chunk in chunks:
            epochs.update(chunk.epochs)
            for event in chunk.events:
                tags.add(event.__struct_config__.tag)  # type: ignore[attr-defined]
                cid = getattr(event, "checkpoint_id", None)
                if cid is not None:
                    touched.add(cid)
            fold_chunks([chunk], self.state)
        self.state.seq = newest
        return self._rows(tags, touched, epochs)

    def _rows(self, tags: set[str], touched: set[str], epochs: set[int]) -> ReadModelRows:
        state = self.state
        assert state is not None
        view = View(state)
        local = tags <= _DECISION_NEUTRAL | _CHECKPOINT_LOCAL
        checkpoints = view.checkpoints
        cids: Iterable[str] = touched if local else checkpoints
        attempts = {a.epoch: a for a in view.attempts}
        # An abort moves its attempt's lineage head back, and an operator may send it: rewrite every attempt.
        if not local or tags & {"attempt.started", "attempt.ended", "checkpoint.aborted"}:
            epochs = set(attempts)
        self._summary = summarize(state, self._summary if tags <= _DECISION_NEUTRAL else None)
        facts = {"summary": _encode(self._summary)}
        if "run.started" in tags:
            facts["run"] = _encode(state.run)
        return ReadModelRows(
            seq=state.seq, version=READ_MODEL_VERSION, facts=facts,
            checkpoints={cid: _checkpoint_row(checkpoints[cid]) for cid in cids if cid in checkpoints},
            attempts={e: _encode(attempts[e]) for e in epochs if e in attempts},
        )


def open_view(reader: StoreReader, at: int | None, best_rule: BestRule | None,
              read: Callable[[Callable[[StoreReader], Any]], Any],
              live: ReadModelFolder | None = None) -> View | None:
    """A :class:`ReadModelView` of the newest state, or ``None`` when the read model cannot answer
    (``at`` is in the past, or the read model is missing, of another version, or behind the log).

    ``read`` runs a function in a later read transaction (for what the view loads lazily);
    ``live``: a writer's folder, whose in-memory state is copied instead of folded when the
    view's full state is asked for at the folder's seq.
    """
    newest = reader.max_seq()
    if at is not None and at < newest:
        return None
    if reader.read_model_seq(version=READ_MODEL_VERSION) != newest:
        return None
    summary = reader.read_model_fact("summary")
    if summary is None:
        return None
    return ReadModelView(reader, _summary.decode(summary), read, best_rule, live)


class ReadModelView(View):
    """A :class:`View` answered from the read model; the full state is folded only if something asks for it.

    ``resume``, ``latest``, ``best`` (under the run's own rule), ``last_step``,
    ``goodput``, ``run``, ``checkpoints``, ``attempts`` and lookups by id or alias
    read rows. Anything else goes to the full state, loaded once by ``load_state``
    (which folds exactly ``seq`` events).
    """

    def __init__(self, reader: StoreReader, summary: Summary, read: Callable[[Callable[[StoreReader], Any]], Any],
                 rule: BestRule | None = None, live: ReadModelFolder | None = None) -> None:
        self._summary = summary
        self._read = read
        self._live = live
        self._full: State | None = None
        self._run = _run.decode(reader.read_model_fact("run") or _encode(None))
        self._stored_rule = BestRule(summary.best_metric, summary.best_mode)
        self._rule = rule or self._stored_rule
        self._picked = {name: _checkpoint.decode(row) for name, cid in
                        (("resume", summary.resume), ("latest", summary.latest), ("best", summary.best))
                        if cid is not None and (row := reader.read_model_checkpoint(cid)) is not None}
        self._checkpoints: dict[str, CheckpointState] | None = None
        self._attempts: list[AttemptState] | None = None

    def _rows(self, fn: Callable[[StoreReader], Any]) -> Any:
        """``fn(reader)`` if the read model still covers exactly this view's seq, else ``None``."""
        seq = self._summary.seq
        return self._read(lambda r: fn(r) if r.read_model_seq(version=READ_MODEL_VERSION) == seq else None)

    @property
    def _state(self) -> State:  # type: ignore[override]  # View's methods read it: fold on first use
        if self._full is None:
            seq = self._summary.seq
            copy = self._live.copy_at(seq) if self._live is not None else None
            self._full = copy if copy is not None else self._read(lambda r: load_state(r, seq))
        return self._full

    def __getattr__(self, name: str) -> Any:
        # Attributes a newer View sets in __init__ come from a full view over the folded state.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(View(self._state, self._rule), name)

    @property
    def seq(self) -> int:
        return self._summary.seq

    @property
    def run(self) -> RunInfo | None:
        return self._run

    @property
    def resume(self) -> CheckpointState | None:
        return self._picked.get("resume")

    @property
    def latest(self) -> CheckpointState | None:
        return self._picked.get("latest")

    @property
    def best(self) -> BestCheckpoint | None:
        if self._rule != self._stored_rule:
            return super().best
        found = self._picked.get("best")
        if found is None or self._summary.best_value is None:
            return None
        return BestCheckpoint(found, self._rule.metric, self._summary.best_value)

    @property
    def last_step(self) -> int | None:
        return self._summary.last_step

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._summary.aliases)

    @property
    def goodput(self) -> float:
        return self._summary.goodput

    @property
    def checkpoints(self) -> dict[str, CheckpointState]:
        if self._checkpoints is None:
            rows = self._rows(lambda r: r.read_model_checkpoints())
            if rows is None:  # the log moved on since this view was taken: answer from the fold
                return View(self._state, self._rule).checkpoints
            decoded = [_checkpoint.decode(row) for row in rows]
            self._checkpoints = {c.checkpoint_id: c for c in decoded}
        return self._checkpoints

    @property
    def attempts(self) -> list[AttemptState]:
        if self._attempts is None:
            rows = self._rows(lambda r: r.read_model_attempts())
            if rows is None:
                return View(self._state, self._rule).attempts
            self._attempts = [_attempt.decode(row) for row in rows]
        return self._attempts

    def checkpoint(self, ref: str) -> CheckpointState:
        """Look up ``latest``, ``best``, a checkpoint id or a user alias (from rows; errors from :class:`View`)."""
        if ref == "latest":
            found = self.latest
        elif ref == "best":
            best = self.best
            found = best.checkpoint if best else None
        else:
            found = self.checkpoints.get(ref)
            if found is None and ref in self._summary.aliases:
                found = self.checkpoints.get(self._summary.aliases[ref])
        return found if found is not None else super().checkpoint(ref)

    @property
    def anomalies(self) -> list[str]:
        return list(self._state.anomalies) if self._summary.anomalies else []
