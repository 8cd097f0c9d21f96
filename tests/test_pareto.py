"""The bench over several budgets: budgets from the floor, the summary per budget and method, the verdicts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flexslim.bench.pareto import budgets_for, pareto_summary, pareto_verdicts, write_pareto
from flexslim.cli import app
from flexslim.errors import BadInput


def _row(budget, method, ms, acc, seed=0):
    return {"budget_ms": budget, "method": method, "measured_ms": ms, "acc_retrained": acc, "seed": seed,
            "widths": {"a": 8, "b": 16}, "budget_met": ms <= budget}  # fmt: skip


def test_budgets_are_multiples_of_the_floor():
    assert budgets_for(0.08, (1.5, 2.5, 4.0)) == [0.12, 0.2, 0.32]
    for bad in ((), (1.0,), (0.5, 2.0)):
        with pytest.raises(BadInput, match="--floor-x"):
            budgets_for(0.08, bad)


def test_summary_counts_the_window_and_verdicts_say_the_noise(tmp_path):
    rows = [
        _row(0.1, "flexcharts", 0.095, 0.86, 0), _row(0.1, "flexcharts", 0.093, 0.87, 1),
        _row(0.1, "uniform", 0.097, 0.84, 0), _row(0.1, "uniform", 0.085, 0.85, 1),
        _row(0.2, "flexcharts", 0.19, 0.88), _row(0.2, "uniform", 0.195, 0.881),
        {"budget_ms": 0.2, "method": "random", "error": "boom"},
    ]  # fmt: skip
    summary = pareto_summary(rows)
    fc = next(s for s in summary if s["budget_ms"] == 0.1 and s["method"] == "flexcharts")
    un = next(s for s in summary if s["budget_ms"] == 0.1 and s["method"] == "uniform")
    assert fc["runs"] == 2 and fc["in_window"] == 2 and un["in_window"] == 1  # 0.085 is under 0.90 x budget
    assert fc["acc_retrained"][0] == pytest.approx(0.865) and fc["ratio"][0] == pytest.approx(0.94)
    lines = pareto_verdicts(summary)
    assert "0.1 ms: FlexCHarts vs uniform: +2.00 points (outside the noise)" in lines
    assert "0.2 ms: FlexCHarts vs uniform: -0.10 points (one run)" in lines
    write_pareto(rows, tmp_path, "toy", 0.05)
    md = (tmp_path / "pareto.md").read_text()
    assert "| 0.1 | 2.00 | flexcharts | 2 |" in md and (tmp_path / "pareto.png").stat().st_size > 1000
    assert json.loads((tmp_path / "pareto.json").read_text())["floor_ms"] == 0.05


@pytest.mark.parametrize("value", ["1.5,abc", "0.5", "1.5,inf"])
def test_bad_floor_multiples_are_exit_2_before_anything_is_measured(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["bench", "--recipe", "quickstart", "--floor-x", value, "--out", "b"])
    assert res.exit_code == 2, res.output
    assert res.output.count("error:") == 1 and "Traceback" not in res.output
