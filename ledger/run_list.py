"""Every run of a PostgreSQL ledger database, summarized (``ckpt-ledger runs URL``).

Each summary is what the run's own projection says — the same :class:`~ledger.view.View`
decisions ``inspect`` prints — read in one consistent transaction for all runs. Runs
whose read model is current (every run a current ckpt-ledger writes) are answered from
its rows, a constant two queries for the whole database; any other run is folded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from ledger.errors import LedgerError
from ledger.projection import AttemptState, RunInfo
from ledger.read_model import READ_MODEL_VERSION, Summary, load_state
from ledger.run_address import PostgresRun, parse_run_address
from ledger.store import StoreReader
from ledger.view import View

if TYPE_CHECKING:
    from ledger.store.postgres_runs import StoredRun

# The read model's rows are msgpack-encoded structs (ledger/read_model.py).
_summary_rows = msgspec.msgpack.Decoder(Summary)
_run_rows = msgspec.msgpack.Decoder(RunInfo | None)
_attempt_rows = msgspec.msgpack.Decoder(AttemptState)


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One run of a database: who it is, how far it got, what a restart would load, how it stands."""

    run: str
    """The run's name (``?run=NAME``)."""
    run_id: str | None
    """The ``run_id`` its ``run.started`` recorded (``None`` before one)."""
    last_step: int | None
    resume: dict[str, Any] | None
    """``{checkpoint_id, step}`` a restart would load, or ``None``."""
    status: str
    """The newest attempt's status (``running``, ``completed``, ``preempted``, ``failed``, ``fenced``,
    ``crashed``), or ``not started``."""
    goodput: float
    attempts: int
    events: int
    url: str
    """The run's address (no password), to pass to ``inspect`` and the other commands."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def _summary(name: str, url: str, view: View, events: int) -> RunSummary:
    resume = view.resume
    attempts = view.attempts
    return RunSummary(
        run=name, run_id=view.run.run_id if view.run else None, last_step=view.last_step,
        resume={"checkpoint_id": resume.checkpoint_id, "step": resume.step} if resume else None,
        status=attempts[-1].status if attempts else "not started", goodput=view.goodput, attempts=len(attempts),
        events=events, url=url,
    )


def list_runs(database: str | PostgresRun) -> list[RunSummary]:
    """Summaries of every run in a PostgreSQL ledger database, by name. Read-only: creates nothing."""
    address = parse_run_address(database, require_run=False)
    if not isinstance(address, PostgresRun):
        raise LedgerError(f"{address} is a directory; `runs` lists the runs of a PostgreSQL database "
                          "(postgresql://USER@HOST:PORT/DB)")
    try:
        from ledger.store.postgres_runs import read_runs
    except ImportError as exc:  # psycopg is the optional `postgres` extra
        raise LedgerError(f"listing {address.database_url} needs psycopg ({exc}); "
                          "install it with: pip install 'ckpt-ledger[postgres]'") from None
    summaries = []
    with read_runs(address) as snapshot:
        stored_runs = snapshot.runs()
        fresh = {s.run: _summary_rows.decode(s.summary) for s in stored_runs if _read_model_current(s)}
        steps = snapshot.checkpoint_steps([(run, f.resume) for run, f in fresh.items() if f.resume is not None])
        urls = address.run_urls([s.run for s in stored_runs])
        for stored, url in zip(stored_runs, urls):
            facts = fresh.get(stored.run)
            if facts is None:  # no current read model (written by an older ckpt-ledger): fold this run
                view = View(load_state(snapshot.reader(stored.run), stored.last_seq))
                summaries.append(_summary(stored.run, url, view, stored.last_seq))
                continue
            run_info = _run_rows.decode(stored.run_info) if stored.run_info is not None else None
            newest = _attempt_rows.decode(stored.newest_attempt) if stored.newest_attempt is not None else None
            summaries.append(RunSummary(
                run=stored.run, run_id=run_info.run_id if run_info else None, last_step=facts.last_step,
                resume={"checkpoint_id": facts.resume, "step": steps[(stored.run, facts.resume)]}
                if facts.resume is not None else None,
                status=newest.status if newest else "not started", goodput=facts.goodput,
                attempts=stored.attempts, events=stored.last_seq, url=url,
            ))
    return summaries


def _read_model_current(stored: StoredRun) -> bool:
    return (stored.read_model_version == READ_MODEL_VERSION and stored.read_model_seq == stored.last_seq
            and stored.summary is not None)
