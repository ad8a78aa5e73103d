"""``trainer.CheckpointManager`` on a run in PostgreSQL: the user's own loop, its shards under ``blobs=``."""

from __future__ import annotations

import pytest
import torch

from test_checkpoint_manager import run, weights
from trainer import BadInputError, CheckpointManager
from trainer_support import view_of

pytestmark = pytest.mark.timeout(180)


def test_a_loop_resumes_bitwise_from_a_database_run(tmp_path, pg_run_url):
    reference, _ = run(tmp_path / "ref", 12, save_every=4)
    blobs = tmp_path / "blobs"
    _, first = run(pg_run_url, 12, save_every=4, stop_at=6, blobs=str(blobs))
    resumed, second = run(pg_run_url, 12, save_every=4)  # blobs= found from run.started
    assert second.restored_from == "step000004-e1" and second.exit_code == 0
    for key, value in weights(reference).items():
        assert torch.equal(value, weights(resumed)[key]), key
    view = view_of(pg_run_url)
    assert [a.status for a in view.attempts] == ["completed", "completed"] and view.resume.step == 12
    assert (blobs / "blobs" / "step000012-e2").is_dir()


def test_bad_database_runs_are_refused_before_anything_is_recorded(pg_run_url):
    with pytest.raises(BadInputError, match="PGPASSWORD") as info:
        CheckpointManager(pg_run_url.replace("ckpt@", "ckpt:hunter2@"), verbose=False)
    assert "hunter2" not in str(info.value)
    with pytest.raises(BadInputError, match="blobs"):
        run(pg_run_url, 4, save_every=2)
    from ledger import Ledger

    with Ledger.open(pg_run_url, read_only=True) as ro:
        assert ro.max_seq() == 0
