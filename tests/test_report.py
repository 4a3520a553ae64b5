"""benchmarks/report.py renders the committed CPU results."""

import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "cpu-2core.json")


@pytest.fixture
def report():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        yield runpy.run_path(os.path.join(ROOT, "benchmarks", "report.py"))
    finally:
        sys.path.pop(0)


def test_report_renders_committed_results(report, tmp_path):
    md, png = tmp_path / "table.md", tmp_path / "chart.png"
    assert report["main"]([RESULTS, "--md", str(md), "--png", str(png)]) == 0
    table = md.read_text()
    for op in ("| oca |", "| synergy |", "| nearl_clip |"):
        assert op in table, op
    rows = [line for line in table.splitlines() if line.startswith("| oca |")]
    assert any("| reference |" in r and "| 1.00x |" in r for r in rows)
    assert any("| fused |" in r for r in rows) and any("| compiled |" in r for r in rows)
    steps = [line for line in table.splitlines() if "| train_step | fused |" in line]
    assert "adapter overhead" in table and steps and "%" in steps[0].split("|")[-2]
    assert "torch" in table.splitlines()[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rejects_bad_input(report, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert report["main"]([str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text('{"benchmarks": []}')
    assert report["main"]([str(empty)]) == 2
