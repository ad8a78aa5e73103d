"""Experiment identity: a hash of the canonical config and the id of the code that ran it."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

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
