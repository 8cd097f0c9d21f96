"""`flexslim sweep`: budgets between the floor and the widest network, one shared table, a search per budget,
the delivered networks measured by the gate; writes sweep.md, sweep.csv, sweep.json and sweep.png."""

from __future__ import annotations

import csv
import json

import pytest
from search_fixtures import FAST_SET, sets
from typer.testing import CliRunner

from flexslim.cli import app
from flexslim.errors import BadInput
from flexslim.jobs.sweep import LOWEST, budgets_between


def test_budgets_are_geometric_from_just_above_the_floor_to_the_top():
    b = budgets_between(0.1, 0.5, 4)
    assert b[0] == pytest.approx(LOWEST * 0.1, rel=1e-3) and b[-1] == pytest.approx(0.5, rel=1e-3)
    ratios = [y / x for x, y in zip(b, b[1:])]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-2)
    assert len(budgets_between(0.1, 0.5, 1)) == 1 and LOWEST * 0.1 < budgets_between(0.1, 0.5, 1)[0] < 0.5
    with pytest.raises(BadInput, match="--budgets"):
        budgets_between(0.1, 0.5, 0)
    with pytest.raises(BadInput, match="widest"):
        budgets_between(0.1, 0.11, 3)


@pytest.mark.slow
def test_sweep_writes_its_table_csv_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the recipe's own widths: the tiny stages' widest network measured within timing noise of their floor (exit 2)
    # search.trim=false: each run's bake measures its first choice only (the fill has its own tests)
    args = sets(
        *FAST_SET, "search.epochs=1", "latency.min_seconds=0.05", "latency.bake_seconds=0.05", "search.trim=false"
    )
    res = CliRunner().invoke(app, ["sweep", "--budgets", "2", "--repeats", "1", "--out", "sw", *args])
    assert res.exit_code in (0, 1), res.output  # 1 when a budget failed or its delivered network measured over it
    out = tmp_path / "sw"
    data = json.loads((out / "sweep.json").read_text())
    rows = data["rows"]
    assert len(rows) == 2 and rows[0]["budget_ms"] < rows[1]["budget_ms"]
    assert data["floor_ms"] < rows[0]["budget_ms"] and rows[1]["budget_ms"] <= data["top_ms"] * 1.001
    done = [r for r in rows if "error" not in r]  # a loaded machine can make the narrowest net miss a budget
    assert done, rows
    for r in rows:
        assert "error" in r or r["budget_ms"] in data_budgets(out)
    for r in done:
        assert r["delivered_ms"] > 0 and len(r["delivered_runs"]) == 1 and 0 <= r["accuracy"] <= 1
        assert r["ratio"] == pytest.approx(r["delivered_ms"] / r["budget_ms"])
        assert (tmp_path / r["run_dir"] / "delivered.onnx").is_file()
    assert (res.exit_code == 1) == any("error" in r or r["delivered_ms"] > r["budget_ms"] for r in rows)
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(t["budget_ms"]) for t in table] == [r["budget_ms"] for r in rows]
    md = (out / "sweep.md").read_text()
    assert "delivered p90" in md and f"of {len(rows)} delivered networks land in [0.90, 1.00]" in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one shared table: the runs used it and measured nothing more
    shared = json.loads((out / "latency.json").read_text())
    for r in done:
        run_table = json.loads((tmp_path / r["run_dir"] / "latency.json").read_text())
        assert run_table["fit_points"] == shared["fit_points"]
        assert set(shared["budgets"]) >= {r["budget_ms"] for r in rows}


def data_budgets(out) -> list[float]:
    return json.loads((out / "latency.json").read_text())["budgets"]


def test_the_delivered_network_is_timed_with_the_runs_latency_settings(tmp_path, monkeypatch):
    """The gate must time the delivered network as the search did (threads, batch, percentile from the run)."""
    import onnx
    from conftest import TINY_STAGES

    import flexslim.jobs.sweep
    from flexslim.jobs.sweep import delivered_latency
    from flexslim.models.arch import Arch
    from flexslim.models.families import build_network
    from flexslim.recipe.schema import load_recipe
    from flexslim.system.runs import RunRecord
    from flexslim.train.checkpoint import save_model

    seen = {}

    def fake_gate(model, report, flags=()):
        seen.update({p.key: p.value for p in onnx.load(str(model)).metadata_props})
        seen["flags"] = list(flags)
        return {"latency_ms": 0.05, "accuracy": 0.9}

    run = tmp_path / "run"
    run.mkdir()
    arch = Arch("resnet", TINY_STAGES, (1, 16, 16), 10, "quickstart", (0.3,), (0.35,), stem_width=8)
    save_model(run / "supernet_baked.pt", arch, build_network(arch), load_recipe("quickstart"), {})
    settings = {"provider": "cpu", "batch": 7, "threads": 1, "percentile": 90.0}
    RunRecord(run).update(recipe="quickstart", latency=settings)
    monkeypatch.setattr(flexslim.jobs.sweep, "gate_in_fresh_process", fake_gate)
    out = delivered_latency(run, 0.1, repeats=2)
    assert out["delivered_ms"] == 0.05 and out["delivered_runs"] == [0.05, 0.05]
    assert seen["flexslim.latency_threads"] == "1" and seen["flexslim.latency_batch"] == "7"
    assert seen["flexslim.budget_ms"] == repr(0.1)
    assert seen["flags"][seen["flags"].index("--threads") + 1] == "1"  # passed as flags too: metadata only describes


def test_the_sweeps_fresh_gates_are_recorded_as_this_devices_re_timings(tmp_path, monkeypatch):
    """Each fresh gate's reading of a delivered network against the figure the bake delivered it on is one of the
    device's re-timings (the headroom's measured floor, as the export gate's reading is): only a gate that timed in
    full on the device that baked it. Only the first gate reads the accuracy."""
    from conftest import TINY_STAGES

    import flexslim.jobs.sweep
    from flexslim.jobs.sweep import delivered_latency
    from flexslim.latency import rechecks
    from flexslim.models.arch import Arch
    from flexslim.models.families import build_network
    from flexslim.recipe.schema import load_recipe
    from flexslim.system.runs import RunRecord
    from flexslim.train.checkpoint import save_model

    device, elsewhere = "0123456789abcdef", "fedcba9876543210"
    reports = iter([
        {"latency_ms": 0.052, "device_fingerprint": device, "stopped": None, "accuracy": 0.9},
        {"latency_ms": 0.060, "device_fingerprint": elsewhere, "stopped": None, "accuracy": 0.9},
        {"latency_ms": 0.070, "device_fingerprint": device, "stopped": "timeout", "accuracy": 0.9},
        {"latency_ms": 0.049, "device_fingerprint": device, "stopped": None, "accuracy": 0.9},
    ])  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    arch = Arch("resnet", TINY_STAGES, (1, 16, 16), 10, "quickstart", (0.3,), (0.35,), stem_width=8)
    save_model(run / "supernet_baked.pt", arch, build_network(arch), load_recipe("quickstart"), {})
    settings = {"provider": "cpu", "batch": 4, "threads": 1, "percentile": 90.0}
    RunRecord(run).update(recipe="quickstart", latency=settings, measuring_device={"id": device}, measured_ms=0.050)
    flags = []

    def fake_gate(model, report, flags_given=()):
        flags.append(list(flags_given))
        return next(reports)

    monkeypatch.setattr(flexslim.jobs.sweep, "gate_in_fresh_process", fake_gate)
    out = delivered_latency(run, 0.06, repeats=4)
    assert rechecks.moves(device) == pytest.approx([0.04, 0.02]) and rechecks.moves(elsewhere) == []
    # the first gate reads the accuracy, the other three only time the same graph
    assert out["accuracy"] == 0.9 and ["--dataset" in f for f in flags] == [True, False, False, False]
    assert all(f[f.index("--threads") + 1] == "1" for f in flags)


def test_the_gate_runs_in_a_fresh_process_and_its_report_is_read(tmp_path, exported):
    from flexslim.jobs.sweep import gate_in_fresh_process

    # a model without a budget in its metadata: the budget as a flag (a gate with nothing to check is exit 2)
    report = gate_in_fresh_process(exported.path, tmp_path / "r.json", ["--latency-ms", "1000"])
    assert report["latency_ms"] > 0 and report["provider"] == "cpu" and (tmp_path / "r.json").is_file()


def test_min_accuracy_picks_the_fastest_network_that_reaches_it():
    """The high-resource scenario: the fastest delivered network at or above the accuracy; failed budgets and
    rows over their budget never count; none reaching it gives the most accurate as the best found."""
    from flexslim.jobs.sweep import fastest_reaching

    rows = [
        {"budget_ms": 0.1, "delivered_ms": 0.095, "accuracy": 0.86, "widths": {"a": 8}},
        {"budget_ms": 0.2, "delivered_ms": 0.19, "accuracy": 0.90, "widths": {"a": 16}},
        {"budget_ms": 0.3, "delivered_ms": 0.29, "accuracy": 0.91, "widths": {"a": 24}},
        {"budget_ms": 0.15, "delivered_ms": 0.16, "accuracy": 0.95, "widths": {"a": 12}},  # over its budget
        {"budget_ms": 0.05, "error": "impossible"},
    ]
    fastest, best = fastest_reaching(rows, 0.89)
    assert fastest["widths"] == {"a": 16} and best["widths"] == {"a": 24}
    assert fastest_reaching(rows, 0.95) == (None, rows[2])


def test_min_accuracy_without_retrain_is_exit_2(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flexslim.cli import app

    monkeypatch.chdir(tmp_path)
    for args in (["--min-accuracy", "0.9"], ["--min-accuracy", "1.5", "--retrain"]):
        res = CliRunner().invoke(app, ["sweep", "--recipe", "quickstart", "--out", "s", *args])
        assert res.exit_code == 2 and res.output.count("error:") == 1 and "Traceback" not in res.output, res.output
