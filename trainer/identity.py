"""Experiment identity: a hash of the canonical config, the id of the user's code that ran it, and ours.

``run.started.code_id`` is the git commit of the tree holding the *user's* entry script
(``sys.argv[0]``; ``python -m pkg`` sets it to the module's file), not of ckpt-ledger;
``run.started.ledger_version`` names the ckpt-ledger that wrote the run.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

_PACKAGE_DIR = Path(__file__).resolve().parent


def canonical_json(config: dict[str, Any]) -> str:
    """Sorted-key, whitespace-free JSON: equal configs give equal text."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def config_hash(config: dict[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``config``."""
    return "sha256:" + hashlib.sha256(canonical_json(config).encode()).hexdigest()


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode(errors="replace")


def code_id(path: Path = _PACKAGE_DIR) -> str | None:
    """The git commit of the tree holding ``path``; ``<sha>-dirty-<diffhash>`` with uncommitted changes.

    ``None`` when the code is not in a git checkout (an installed wheel) or git is missing.
    Untracked files do not count as dirty: run directories and caches often live there.
    """
    head = _git(["rev-parse", "HEAD"], path)
    if head is None:
        return None
    sha = head.strip()
    diff = _git(["diff", "HEAD", "--no-ext-diff", "--binary"], path)
    if diff:
        return f"{sha}-dirty-{hashlib.sha256(diff.encode()).hexdigest()[:10]}"
    return sha


def entry_script(argv: Sequence[str] | None = None) -> Path | None:
    """The file the user ran: ``argv[0]`` (a script, or the module file under ``-m``), else ``__main__``'s file."""
    argv = sys.argv if argv is None else argv
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    for candidate in (argv[0] if argv else None, main_file):
        if candidate and candidate not in ("-c", "-m") and Path(candidate).is_file():
            return Path(candidate).resolve()
    return None


def user_code_id(argv: Sequence[str] | None = None) -> str | None:
    """:func:`code_id` of the tree holding the user's entry script (``None`` outside git or without one)."""
    entry = entry_script(argv)
    return code_id(entry.parent) if entry is not None else None


def ledger_version() -> str:
    """ckpt-ledger's version, plus its git commit when it runs from a checkout (``0.1.0+<sha>``)."""
    try:
        version = metadata.version("ckpt-ledger")
    except metadata.PackageNotFoundError:
        version = "unknown"
    ours = code_id(_PACKAGE_DIR)
    return f"{version}+{ours}" if ours else version
