"""Raw access to a ledger file that bypasses every rule of the store — for tests and benchmarks only.

Fault-injection tests use this to do what a foreign tool, a bit flip or a careless
user might (rewrite a row, bump the format marker, delete events, hold a WAL open);
benchmarks use it to measure the floor any reader of the same rows pays. Nothing
in ckpt-ledger itself imports this module; having it here keeps every ``sqlite3``
use inside :mod:`ledger.store`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


def connect(path: str | Path, **kwargs: Any) -> sqlite3.Connection:
    """A plain ``sqlite3`` connection (same arguments as :func:`sqlite3.connect`); the caller closes it."""
    return sqlite3.connect(path, **kwargs)
