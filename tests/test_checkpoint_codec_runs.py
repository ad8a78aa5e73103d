"""A run's checkpoint codec: smaller files, the same training, and every attempt reads every codec."""

from __future__ import annotations

import pytest

from trainer_support import (
    QUICK,
    assert_bitwise_equal,
    export_state,
    reference_run,
    run_cli,
    view_of,
)


def _bytes_at(run_dir, step: int) -> int:
    [ckpt] = [c for c in view_of(run_dir).checkpoints.values() if c.step == step and c.status == "committed"]
    return sum(s.bytes for s in ckpt.shards)


@pytest.mark.timeout(600)
def test_byte_grouped_checkpoints_are_smaller_and_resume_across_codecs_bitwise(tmp_path, tmp_path_factory):
    reference_dir, reference = reference_run(tmp_path_factory, "fsdp")  # --codec none (the default)
    run_dir = tmp_path / "run"
    first = run_cli("train", "--run-dir", str(run_dir), "--stack", "fsdp", "--nproc", "2", "--codec", "zstd-bg",
                    "--steps", "20", "--ckpt-every", "10", "--eval-every", "10")
    assert first.returncode == 0, first.stderr
    # Same training, fewer bytes: the codec changes how tensors are stored, nothing else.
    assert _bytes_at(run_dir, 20) < 0.95 * _bytes_at(reference_dir, 20)
    assert_bitwise_equal(export_state(run_dir, tmp_path / "at20.pt"),
                         export_state(reference_dir, tmp_path / "ref20.pt", checkpoint="step000020-e1"))

    # The next attempt writes plain checkpoints and resumes from the byte-grouped one.
    second = run_cli("train", "--run-dir", str(run_dir), "--stack", "fsdp", "--nproc", "2", *QUICK)
    assert second.returncode == 0, second.stderr
    assert view_of(run_dir).attempts[1].resumed_from == "step000020-e1"
    assert_bitwise_equal(export_state(run_dir, tmp_path / "final.pt"), reference)


def test_an_unknown_codec_is_refused_before_anything_starts(tmp_path):
    done = run_cli("train", "--run-dir", str(tmp_path / "run"), "--codec", "lz4", timeout=60)
    assert done.returncode == 2 and "--codec" in done.stderr
    assert not (tmp_path / "run").exists()
