"""``ckpt-ledger timeline``: a valid PNG, SVG or self-contained HTML, written atomically."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from cli.main import cli
from ledger import Ledger
from runs import build_crashed_run, build_healthy_run, snapshot_tree

pytest.importorskip("matplotlib")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    return build_crashed_run(tmp_path_factory.mktemp("tl") / "run")


def test_png(crashed, tmp_path):
    before = snapshot_tree(crashed.run_dir)
    out = tmp_path / "run.png"
    result = invoke("timeline", crashed.run_dir, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.png"]  # no temp file left behind
    assert snapshot_tree(crashed.run_dir) == before


def test_svg_parses_and_shows_the_story(crashed, tmp_path):
    out = tmp_path / "run.svg"
    assert invoke("timeline", crashed.run_dir, "--out", out).exit_code == 0
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    text = out.read_text()
    for label in ("attempt 1", "attempt 2", "checkpoints", "crashed", "latest", "best eval_loss=0.9", "loss",
                  "checkpoint torn", "checkpoint aborted"):
        assert label in text, label
    # Same ledger, same bytes.
    again = tmp_path / "again.svg"
    invoke("timeline", crashed.run_dir, "--out", again)
    assert again.read_bytes() == out.read_bytes()


def test_html_is_self_contained(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    out = tmp_path / "report.HTML"
    assert invoke("timeline", info.run_dir, "--out", out).exit_code == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and page.rstrip().endswith("</html>")
    assert "preemption" in page and "<script" not in page and 'src="http' not in page and "<link" not in page
    assert "run run" in page and info.committed[-1] in page


def test_overwrites_an_existing_file_atomically(tmp_path):
    info = build_healthy_run(tmp_path / "run")
    out = tmp_path / "run.png"
    out.write_bytes(b"old")
    assert invoke("timeline", info.run_dir, "--out", out).exit_code == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_empty_run_still_draws(tmp_path):
    Ledger.open(tmp_path / "run").close()
    out = tmp_path / "empty.svg"
    assert invoke("timeline", tmp_path / "run", "--out", out).exit_code == 0
    assert ET.parse(out).getroot().tag.endswith("svg")


def test_timeline_shows_the_tree_fenced_attempts_and_the_wall_clock(tmp_path):
    from runs import cid_for, save_checkpoint, start, train_steps

    from ledger.events import AttemptEnded

    run_dir = tmp_path / "run"
    led = start(run_dir)
    a = led.begin_attempt().epoch
    for step in (10, 20, 30):
        train_steps(led, a, step - 9, step)
        save_checkpoint(led, a, step)
    b = led.begin_attempt(resumed_from=cid_for(10, a)).epoch  # an explicit branch from 10: fences a
    led.append(AttemptEnded(epoch=a, reason="fenced", last_step=30, fenced_by=b), epoch=None)
    train_steps(led, b, 11, 25)
    save_checkpoint(led, b, 20)
    led.close()
    out = tmp_path / "t.svg"
    assert invoke("timeline", run_dir, "--out", out).exit_code == 0
    svg = out.read_text()
    assert f'id="lineage-e{b}-from-{cid_for(10, a)}"' in svg
    assert 'id="wall-clock"' in svg
    assert f"fenced by epoch {b}" in svg and "abandoned branch" in svg and "resumed from" in svg
