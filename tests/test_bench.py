"""`flexslim bench` end to end on a tiny setting: every method in its own process, table + CSV + PNG."""

from __future__ import annotations

import csv
import json

import pytest
from search_fixtures import TINY_SET, sets
from typer.testing import CliRunner

from flexslim.bench import verdicts
from flexslim.cli import app


@pytest.mark.slow
def test_bench_writes_the_table_csv_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fast = sets(
        *TINY_SET,
        "search.epochs=1",
        "latency.samples=4",
        "latency.holdout=1",
        "latency.runs=5",
        "latency.min_seconds=0",
        "latency.warmup=1",
        "search.extend_samples=2",
        "search.batch_size=256",
    )
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "--recipe",
            "quickstart",
            "--methods",
            "flexcharts,dmask-large,uniform",
            "--latency-ms",
            "2.0",
            "--out",
            "b",
            *fast,
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [r["method"] for r in rows] == ["flexcharts", "dmask-large", "uniform"]
    for r in rows:
        assert "error" not in r, r
        assert r["budget_met"] == (r["measured_ms"] <= 2.0)
        assert r["peak_mb"] > 0 and r["mflops"] > 0 and r["params_k"] > 0 and r["search_seconds"] >= 0
    assert rows[0]["acc_supernet"] is not None and 0 <= rows[0]["acc_supernet"] <= 1
    with open(tmp_path / "b" / "bench.csv") as f:
        assert len(list(csv.reader(f))) == 4
    assert (tmp_path / "b" / "bench.png").stat().st_size > 1000
    table = (tmp_path / "b" / "bench.md").read_text()
    assert "| flexcharts |" in table and "Search time: DMask-large / FlexCHarts" in table


def test_verdicts_say_plainly_what_did_not_happen():
    rows = [
        {
            "method": "flexcharts",
            "budget_met": True,
            "measured_ms": 0.2,
            "search_seconds": 10.0,
            "search_mb": 50.0,
            "peak_mb": 500.0,
        },
        {
            "method": "dmask-large",
            "budget_met": False,
            "measured_ms": 0.4,
            "search_seconds": 5.0,
            "search_mb": 100.0,
            "peak_mb": 600.0,
        },
        {
            "method": "dmask-small",
            "budget_met": True,
            "measured_ms": 0.25,
            "search_seconds": 4.0,
            "search_mb": 30.0,
            "peak_mb": 450.0,
        },
    ]
    text = "\n".join(verdicts(rows))
    assert "FlexCHarts meets" in text
    assert "FlexCHarts NOT faster" in text  # 5 / 10 = 0.5x
    assert "FlexCHarts lower" in text  # 100 / 50 = 2x
    assert "DMask-large MISSES" in text
    assert "DMask-small MEETS" in text


def test_unknown_method_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["bench", "--recipe", "quickstart", "--methods", "nope", "--latency-ms", "1"])
    assert res.exit_code == 2
