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
