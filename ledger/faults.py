"""Named crash points for fault-injection tests.

Set ``CKPT_LEDGER_CRASH_AT=<point>`` (optionally ``<point>:<n>`` to crash at the
n-th time the point is reached, counting from 1) and the process SIGKILLs itself
there, exactly as a power cut or OOM-killer would stop it: no ``finally`` blocks,
no flushing. With ``CKPT_LEDGER_CRASH_ONCE=<file>`` as well, the crash fires only in
the process that creates that file first: a worker restarted by its launcher (which
inherits the environment) then runs past the point. When the variable is unset, :func:`crash_point` is a dictionary-free
``None`` check, so the hooks cost nothing in production.

Every point is listed in :data:`CRASH_POINTS` with what has happened when it fires.
"""

from __future__ import annotations

import os
import signal

#: Every named point, with the state of the world when it fires.
CRASH_POINTS: dict[str, str] = {
    "blob.after_temp_write": "shard bytes written to the temp file, not yet fsynced",
    "blob.after_fsync": "temp file fsynced, not yet renamed into place",
    "blob.after_rename": "shard renamed into place, directory not yet fsynced",
    "blob.after_dir_fsync": "shard durable under its final name, not yet recorded",
    # PostgreSQL backend only (tests/test_postgres_ledger.py drives it; the SQLite writer never reaches it):
    "store.before_commit": "inside a PostgreSQL append: events inserted, the transaction not yet committed",
    "ledger.after_shard_written": "shard.written appended for one shard",
    "ledger.before_commit": "all shards recorded, checkpoint.committed not yet appended",
    "ledger.after_commit": "checkpoint.committed appended and durable",
    "retention.after_deletion_requested": "deletion_requested appended, no blob removed yet",
    "retention.after_blob_removed": "one blob of the checkpoint removed",
    "retention.after_deleted": "checkpoint.deleted appended",
    # Trainer points (any name under "trainer." is accepted, e.g. per rank):
    "trainer.after_step": "a training step finished, before any checkpoint of it",
    "trainer.rank<N>.after_step": "as above, only on rank N",
    "trainer.after_shard_write": "this rank's DCP files are written and hashed, facts not yet sent to rank 0",
    "trainer.rank<N>.after_shard_write": "as above, only on rank N",
    "trainer.before_commit": "rank 0 recorded every shard, checkpoint.committed not yet appended",
    "trainer.after_commit": "checkpoint.committed appended",
}

_ENV = "CKPT_LEDGER_CRASH_AT"
_ONCE_ENV = "CKPT_LEDGER_CRASH_ONCE"


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, count = spec.partition(":")
    if name not in CRASH_POINTS and not name.startswith("trainer."):
        raise ValueError(f"{_ENV}={spec!r}: unknown crash point; known points: {', '.join(CRASH_POINTS)}")
    try:
        nth = int(count) if count else 1
    except ValueError:
        raise ValueError(f"{_ENV}={spec!r}: the occurrence after ':' must be an integer") from None
    return name, max(nth, 1)


_armed = _parse(os.environ.get(_ENV))
_seen = 0


def crash_point(name: str) -> None:
    """SIGKILL this process if ``CKPT_LEDGER_CRASH_AT`` names ``name`` (at its n-th hit)."""
    global _seen
    if _armed is None or _armed[0] != name:
        return
    _seen += 1
    if _seen >= _armed[1] and _first_to_crash():
        os.kill(os.getpid(), signal.SIGKILL)


def _first_to_crash() -> bool:
    once = os.environ.get(_ONCE_ENV)
    if not once:
        return True
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def rearm(spec: str | None) -> None:
    """Re-read a crash spec (for in-process tests that change the environment)."""
    global _armed, _seen
    _armed, _seen = _parse(spec), 0
