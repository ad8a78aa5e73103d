"""The public outputs of a stored ledger, as one comparable JSON object.

``inspect --json``, ``replay --json`` and ``audit --json`` text, the ``inspect`` and ``audit`` tables, digests of the
projection snapshot bytes and the read-model rows. The committed
``tests/fixtures/old_ledgers/*/public_outputs_by_47d8370.json`` were written by this
module at 47d8370 (before statuses became ``str`` enums); ``test_statuses`` checks
the current code prints the same bytes. Regenerate only on purpose:
``python tests/public_outputs.py`` (run from the repository root).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from cli.main import cli
from ledger import Ledger
from ledger.audit import audit
from ledger.projection import encode_state, fold
from ledger.read_model import full_rows

FIXTURES = Path(__file__).parent / "fixtures" / "old_ledgers"
GOLDEN = "public_outputs_by_47d8370.json"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def public_outputs(fixture: Path) -> dict[str, Any]:
    """What a user's tools can read from the ledger in ``fixture`` (copied first: nothing here writes to it)."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(fixture / "ledger.db", Path(tmp) / "ledger.db")
        runner = CliRunner()
        inspect = runner.invoke(cli, ["inspect", tmp, "--json"])
        replay = runner.invoke(cli, ["replay", tmp, "--json"])
        tables = runner.invoke(cli, ["inspect", tmp]).stdout + runner.invoke(cli, ["audit", tmp]).stdout
        with Ledger.open(tmp, read_only=True) as led:
            state = fold(led.events())
            report = audit(led, process_alive=lambda host, pid: None).to_dict()
        report["run_dir"] = "RUN"  # the temporary copy's path
        rows = full_rows(state)
        checkpoint_rows = json.dumps([[cid, r.started_seq, r.step, str(r.status), r.state.hex()]
                                      for cid, r in sorted(rows.checkpoints.items())])
        return {
            "inspect_json": inspect.stdout,
            "inspect_and_audit_text": tables.replace(tmp, "RUN"),
            "replay_json": replay.stdout,
            "audit_json": json.dumps(report, indent=2),
            "snapshot_sha256": _sha(encode_state(state)),
            "read_model_checkpoints_sha256": _sha(checkpoint_rows.encode()),
            "read_model_attempts_sha256": _sha(b"".join(row for _, row in sorted(rows.attempts.items()))),
            "read_model_facts_sha256": _sha(b"".join(fact for _, fact in sorted(rows.facts.items()))),
        }


if __name__ == "__main__":
    for name in ("linear", "branched"):
        (FIXTURES / name / GOLDEN).write_text(json.dumps(public_outputs(FIXTURES / name), indent=1) + "\n")
