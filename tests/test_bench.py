"""`flexslim bench` end to end on a tiny setting: every method in its own process, table + CSV + PNG."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from search_fixtures import TINY_SET, sets
from typer.testing import CliRunner

from flexslim.bench.report import inside_noise, mean_std, summarize, verdicts, write_outputs
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
        "latency.bake_seconds=0",
        "latency.warmup=1",
        "latency.repeats=1",
        "latency.probe=false",
        "latency.near=1",
        "search.batch_size=256",
        "search.trim=false",  # the measured bake has its own tests; here it would time ~10 networks per method
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
        assert r["predicted_ms"] > 0 and r["dataset"] == "quickstart"
    for r in rows[:2]:  # searched: live-tensor peak from the profiler, over the widest allocation
        assert r["tensor_peak_mb"] > r["tensor_state_mb"] > 0 and r["tensor_source"].startswith("torch.profiler")
        assert r["peak_allocated"] and r["seconds_per_epoch"] > 0
    assert rows[1]["tensor_peak_mb"] > rows[0]["tensor_peak_mb"]  # DMask-large holds 3x the widths
    assert rows[1]["search_gmacs"] > rows[0]["search_gmacs"] > 0 == rows[2]["search_gmacs"]  # uniform: measuring only
    assert all(r["total_gmacs"] == r["search_gmacs"] for r in rows)  # no retraining here
    assert rows[0]["acc_supernet"] is not None and 0 <= rows[0]["acc_supernet"] <= 1
    baked = rows[2]["bake"]  # a baseline's row keeps its bake's timings, as a search's run.json does
    assert baked and baked[-1]["measured_ms"] == rows[2]["measured_ms"] and "window_note" in rows[2]
    with open(tmp_path / "b" / "bench.csv") as f:
        assert len(list(csv.reader(f))) == 4
    assert (tmp_path / "b" / "bench.png").stat().st_size > 1000
    table = (tmp_path / "b" / "bench.md").read_text()
    assert "| flexcharts |" in table and "Search time: DMask-large / FlexCHarts" in table


def _row(method, seed, ms, secs, tensor, met=None, acc=None, **extra):
    return {
        "method": method,
        "seed": seed,
        "widths": {"a": 8},
        "budget_ms": 0.3,
        "measured_ms": ms,
        "predicted_ms": ms,
        "budget_met": ms <= 0.3 if met is None else met,
        "search_seconds": secs,
        "tensor_peak_mb": tensor,
        "peak_mb": 500.0,
        "acc_retrained": acc,
        "dataset": "quickstart",
        **extra,
    }


def test_verdicts_say_plainly_what_did_not_happen():
    rows = [
        _row("flexcharts", None, 0.2, 10.0, 50.0),
        _row("dmask-large", None, 0.4, 5.0, 100.0),
        _row("dmask-small", None, 0.25, 4.0, 30.0, range_ms=[0.1, 0.5]),
    ]
    text = "\n".join(verdicts(rows))
    assert "FlexCHarts meets the budget in 1/1" in text
    assert "FlexCHarts NOT faster" in text  # 5 / 10 = 0.5x
    assert "Tensor memory of the search: DMask-large / FlexCHarts = 2.00x" in text and "FlexCHarts lower" in text
    assert "DMask-large MISSES" in text
    assert "DMask-small meets the budget in 1/1" in text
    assert "spread unknown" in text  # one run each


def test_seeds_give_mean_and_std_and_the_verdicts_name_the_noise():
    rows = [
        _row("flexcharts", 0, 0.20, 10.0, 50.0, acc=0.90),
        _row("flexcharts", 1, 0.22, 12.0, 52.0, acc=0.94),
        _row("flexcharts", 2, 0.31, 11.0, 51.0, acc=0.92),
        _row("dmask-large", 0, 0.25, 30.0, 100.0),
        _row("dmask-large", 1, 0.26, 33.0, 104.0),
        _row("dmask-large", 2, 0.27, 36.0, 98.0),
        _row("dmask-small", 0, 0.35, 4.0, 30.0, range_ms=[0.32, 0.6]),
        _row("uniform", 0, 0.28, 0.0, None, acc=0.91),
        _row("uniform", 1, 0.28, 0.0, None, acc=0.95),
        {"method": "uniform", "seed": 2, "error": "boom"},
    ]
    s = summarize(rows)
    assert s["flexcharts"]["runs"] == 3 and s["flexcharts"]["met"] == 2
    assert s["flexcharts"]["search_seconds"] == pytest.approx((11.0, 1.0))
    assert s["uniform"]["failed"] == 1 and s["uniform"]["tensor_peak_mb"] is None
    assert mean_std([1.0, None, 3.0]) == pytest.approx((2.0, 2**0.5))
    assert inside_noise((1.0, 0.5), (1.5, 0.5)) is True and inside_noise((1.0, 0.1), (3.0, 0.1)) is False
    # one run against three: its spread is taken as the other side's (0.012 apart: outside 0.005 x sqrt 2 = 0.0071,
    # inside 0.01 x sqrt 2 = 0.0141), and two single runs have no known spread
    assert inside_noise((0.850, 0.005), (0.838, 0.0)) is False and inside_noise((0.850, 0.01), (0.838, 0.0)) is True
    assert inside_noise((0.850, 0.0), (0.838, 0.0)) is None
    text = "\n".join(verdicts(rows))
    assert "FlexCHarts meets only sometimes the budget in 2/3" in text
    assert "Search time: DMask-large / FlexCHarts = 3.00x" in text and "outside the noise" in text
    assert "DMask-small MISSES" in text and "narrowest network of its range is predicted 0.3200 ms > 0.3 ms" in text
    assert "Accuracy vs uniform (retrained)" in text and "INSIDE the noise" in text  # 0.92 +- 0.02 vs 0.93 +- 0.03


def test_the_table_shows_mean_and_std_per_method(tmp_path):
    rows = [_row("flexcharts", 0, 0.20, 10.0, 50.0), _row("flexcharts", 1, 0.22, 12.0, 54.0)]
    write_outputs(rows, tmp_path, 0.3, "r")
    text = (tmp_path / "bench.md").read_text()
    assert "| flexcharts | 8 | 0.2100 ± 0.0141 | 0.2100 ± 0.0141 | 2/2 |" in text
    assert "11.0 ± 1.4" in text and "52.0 ± 2.8" in text  # search time, tensor peak
    assert "## Runs" in text and text.count("| flexcharts | 0 |") == 1


def test_unknown_method_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["bench", "--recipe", "quickstart", "--methods", "nope", "--latency-ms", "1"])
    assert res.exit_code == 2


def test_seeds_below_one_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["bench", "--recipe", "quickstart", "--latency-ms", "1", "--seeds", "0"])
    assert res.exit_code == 2 and "--seeds" in res.output


@pytest.mark.parametrize("flag", ["1.5", "-1", "3,random=0", "3,nope=1", "random=", ",", "x"])
def test_malformed_seeds_are_bad_input_naming_the_flag(tmp_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["bench", "--recipe", "quickstart", "--latency-ms", "1", "--seeds", flag])
    assert res.exit_code == 2 and "--seeds" in res.output, res.output
    assert not (tmp_path / "bench").exists()


def test_seeds_per_method_run_each_method_its_own_count_in_seed_order():
    from flexslim.bench.run import _runs, parse_seeds

    assert parse_seeds("3") == 3
    per = parse_seeds("3,random=1,dmask-large=1")
    runs = _runs(["flexcharts", "random", "uniform", "dmask-large"], per, 10)
    got = [(r["method"], r["seed"]) for r in runs]
    assert got == [
        ("flexcharts", 10), ("uniform", 10), ("dmask-large", 10), ("random", 10),
        ("flexcharts", 11), ("uniform", 11),
        ("flexcharts", 12), ("uniform", 12),
    ]  # fmt: skip
    assert {r["run"] for r in runs} >= {"random-seed10", "uniform-seed12"}
    # methods not named get the largest count; one run each keeps the recipe's own seeds (unlabelled)
    assert [r["method"] for r in _runs(["flexcharts", "uniform"], parse_seeds("uniform=2"), 0)].count("flexcharts") == 2
    assert [r["seed"] for r in _runs(["flexcharts", "uniform"], parse_seeds("1,uniform=1"), 0)] == [None, None]


def test_seeds_naming_a_method_the_bench_does_not_run_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--recipe", "quickstart", "--latency-ms", "1", "--methods", "uniform", "--seeds", "2,random=1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "random" in res.output and "--seeds" in res.output, res.output


def test_throughput_times_the_search_loops_own_step(monkeypatch):
    """`flexslim bench --throughput` times search.loop's weight_step and arch_step, not a copy of them."""
    import torch

    import flexslim.search.loop as loop_mod
    from flexslim.bench.throughput import measure_throughput
    from flexslim.recipe.schema import load_recipe

    calls = {"weight_step": 0, "arch_step": 0}
    for name in calls:
        real = getattr(loop_mod, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(loop_mod, name, counted)
    recipe = load_recipe("quickstart", ["search.batch_size=8", "train.batch_size=8"])
    res = measure_throughput(recipe, (1, 16, 16), 10, torch.device("cpu"), steps=2, warmup=1)
    assert calls == {"weight_step": 3, "arch_step": 3}
    assert res["search_images_per_s"] > 0 and res["retrain_images_per_s"] > 0 and res["mask_overhead_ratio"] > 0


def test_every_method_retrains_from_scratch_alike_unless_the_bench_is_told_otherwise():
    """A searched method's run would fine-tune its searched weights by default (train.init = auto) while a baseline
    has none: the bench retrains every method from scratch, so the comparison is of the widths found."""
    from flexslim.bench.worker import run_overrides
    from flexslim.recipe.schema import load_recipe
    from flexslim.search.methods import bench_method

    spec = {"overrides": [], "seed": 1}
    for name in ("flexcharts", "dmask-large", "uniform"):
        recipe = load_recipe("quickstart", run_overrides(spec, bench_method(name)))
        assert recipe.train.init == "scratch" and recipe.search.seed == 1
    told = load_recipe("quickstart", run_overrides({"overrides": ["train.init=searched"]}, bench_method("flexcharts")))
    assert told.train.init == "searched"  # the bench's own --set wins
    # at equal compute the routes are compared: the recipe's own train.init (auto: fine-tune the searched weights)
    routes = load_recipe("quickstart", run_overrides({**spec, "equal_compute": True}, bench_method("flexcharts")))
    assert routes.train.init == "auto" == load_recipe("quickstart", []).train.init


def test_the_compute_accounting_adds_up_on_a_toy_network(tiny_arch):
    """Forward MACs against an independent count (every conv and linear layer's output elements x its weights per
    output), and the search's and retraining's sums from their definitions."""
    import torch

    from flexslim.bench.compute import TRAIN_PASSES, forward_macs, search_gmacs, train_gmacs
    from flexslim.models.families import build_network

    widths = {"stage1": 8, "stage2": 16, "stage3": 24}
    net = build_network(tiny_arch.with_widths(widths)).eval()
    counted = []

    def hook(m, inp, out):
        per_output = m.weight[0].numel() if isinstance(m, torch.nn.Conv2d) else m.in_features
        counted.append(out.numel() * per_output)

    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.rand(1, *tiny_arch.input_shape))
    f = forward_macs(tiny_arch, widths)
    assert f == pytest.approx(sum(counted), rel=0.02)  # (BatchNorm, pooling and adds are not MACs of weights)
    assert forward_macs(tiny_arch, {"stage1": 16, "stage2": 32, "stage3": 48}) > 2.5 * f  # ~4x where it is conv

    history = [
        {"steps": 10, "allocated_before": widths, "arch_ce": 0.0},  # warm-up: the weights step alone
        {"steps": 10, "allocated_before": widths, "arch_ce": 1.9},  # + an architecture step per batch
    ]
    assert search_gmacs(tiny_arch, history, batch_size=4) == pytest.approx((1 + 2) * TRAIN_PASSES * f * 40 / 1e9)
    assert train_gmacs(tiny_arch, widths, epochs=3, images=100) == pytest.approx(TRAIN_PASSES * f * 300 / 1e9)


def test_equal_compute_gives_a_baseline_the_epochs_that_match_flexcharts(tiny_arch, quickstart):
    from flexslim.bench.baselines import _epochs_for
    from flexslim.bench.compute import train_gmacs
    from flexslim.bench.compute import train_images as _train_images
    from flexslim.bench.run import _flexcharts_compute, _runs
    from flexslim.recipe.schema import load_recipe

    assert [r["method"] for r in _runs(["uniform", "random", "flexcharts"], 2, 0)] == [
        "flexcharts",
        "uniform",
        "random",
        "flexcharts",
        "uniform",
        "random",
    ]  # fmt: skip  (FlexCHarts first: the baselines of its seed get its time and compute)
    rows = [{"method": "flexcharts", "seed": 0, "total_gmacs": 50.0}, {"method": "flexcharts", "seed": 1,
            "total_gmacs": 70.0}, {"method": "flexcharts", "seed": 2, "error": "x"}]  # fmt: skip
    assert _flexcharts_compute(rows, 1) == 70.0 and _flexcharts_compute(rows, 2) == 70.0
    assert _flexcharts_compute([], 0) is None

    recipe = load_recipe("quickstart")
    baked = tiny_arch.with_widths({"stage1": 8, "stage2": 16, "stage3": 16})
    per_epoch = train_gmacs(baked, baked.widths, 1, _train_images(quickstart, recipe))
    assert _epochs_for(None, 0.0, baked, recipe, quickstart) == recipe.train.epochs
    assert _epochs_for(10.4 * per_epoch, 0.0, baked, recipe, quickstart) == 10
    assert _epochs_for(10.4 * per_epoch, 3 * per_epoch, baked, recipe, quickstart) == 7  # its own search counts
    assert _epochs_for(0.1 * per_epoch, 5 * per_epoch, baked, recipe, quickstart) == 1  # at least one


def test_equal_compute_needs_flexcharts_and_retraining(cli, tmp_path):
    for args in (["--methods", "uniform", "--retrain"], ["--methods", "flexcharts,uniform", "--no-retrain"]):
        res = cli.invoke(app, ["bench", "--latency-ms", "1", "--equal-compute", "--out", str(tmp_path / "b"), *args])
        assert res.exit_code == 2 and "--equal-compute" in res.stderr, res.output


def test_ceiling_retrains_distinct_networks_in_the_window_and_keeps_the_best(tmp_path, monkeypatch, quickstart):
    """The ceiling baseline's bookkeeping against a fake bake and a fake retraining: draws that bake to a network
    already trained or out of the window are skipped, the best by accuracy is the row, every network is listed and
    its training compute counted."""
    from types import SimpleNamespace

    from search_fixtures import hand_latency_model

    from flexslim.bench import baselines
    from flexslim.models.arch import Arch
    from flexslim.recipe.choices import BENCH_METHODS
    from flexslim.recipe.schema import load_recipe

    recipe = load_recipe("quickstart", ["bench.ceiling_networks=3"])
    arch = Arch.for_data(recipe.model, quickstart)
    table = hand_latency_model(arch, recipe.latency)
    table.save(tmp_path / "t.json")
    budget_ms = 1.05 * float(table.predict(arch.widths))
    baked = iter([{"stage1": 8}, {"stage1": 8}, {"stage1": 16}, {"stage1": 24}, {"stage1": 32}])
    window = iter([True, True, False, True, True])

    def fake_bake(arch, widths, budget, table, recipe):
        w = {**arch.widths, **next(baked)}
        return SimpleNamespace(widths=w, measured_ms=budget.ms * (0.95 if next(window) else 0.5))

    def fake_retrain(row, net, spec, recipe, ds, dev):
        acc = {8: 0.80, 24: 0.90, 32: 0.85}[net.widths["stage1"]]
        return {**row, "acc_retrained": acc, "train_init": "scratch", "train_epochs": 1, "train_seconds": 0.0,
                "train_gmacs": float(net.widths["stage1"])}, net  # fmt: skip

    monkeypatch.setattr(baselines, "_baked", fake_bake)
    monkeypatch.setattr(baselines, "_retrained", fake_retrain)
    spec = {"latency_table": str(tmp_path / "t.json"), "budget_ms": budget_ms, "retrain": True, "run": "c",
            "out": str(tmp_path)}  # fmt: skip
    row, best = baselines.ceiling_row(spec, BENCH_METHODS["ceiling"], recipe, quickstart, torch.device("cpu"))
    assert [c["widths"]["stage1"] for c in row["ceiling"]] == [8, 24, 32]  # the repeat and the 0.5 x skipped
    assert best.widths["stage1"] == 24 and row["acc_retrained"] == 0.90 and row["candidates"] == 3
    assert row["ceiling_mean"] == pytest.approx((0.80 + 0.90 + 0.85) / 3) and "peak_mb" in row
    assert row["train_gmacs"] == 8 + 24 + 32 and row["measured_ms"] == pytest.approx(0.95 * budget_ms)


def test_ceiling_without_retraining_is_bad_input(quickstart):
    from flexslim.bench import baselines
    from flexslim.errors import BadInput
    from flexslim.recipe.choices import BENCH_METHODS
    from flexslim.recipe.schema import load_recipe

    with pytest.raises(BadInput, match="--retrain"):
        baselines.ceiling_row({"retrain": False}, BENCH_METHODS["ceiling"], load_recipe("quickstart"), quickstart, None)


def test_a_finished_runs_line_reads_only_what_its_row_holds():
    """A ceiling row (no search, no tensor window, no memory figure of a search) once stopped the whole bench with
    a KeyError after 21 minutes: the line names what the row has and leaves the rest out."""
    from flexslim.bench.run import run_line

    row = {"widths": {"a": 8}, "measured_ms": 0.0964, "predicted_ms": 0.0881, "budget_met": True,
           "acc_retrained": 0.8412}  # fmt: skip
    line = run_line("ceiling-seed0", row)
    assert "0.0964 ms measured" in line and "accuracy 0.8412" in line and "RSS" not in line
    full = run_line("flexcharts-seed0", {**row, "search_seconds": 51.0, "tensor_peak_mb": 163.5, "peak_mb": 1132.0})
    assert "search 51s" in full and "tensors 163.5 MB" in full and "peak RSS 1132 MB" in full


def test_equal_compute_splits_the_prune_route_evenly_between_its_wide_training_and_fine_tuning(tiny_arch, quickstart):
    """The prune route at FlexCHarts' compute: E epochs of the wide network plus E of the pruned one add up to the
    target (whole epochs, nearest), at least one of each; without a target the recipe's epochs."""
    from flexslim.bench.baselines import prune_epochs
    from flexslim.bench.compute import train_gmacs
    from flexslim.bench.compute import train_images as _train_images
    from flexslim.bench.run import EQUAL_COMPUTE
    from flexslim.recipe.schema import load_recipe

    recipe = load_recipe("quickstart")
    wide = tiny_arch.with_widths({"stage1": 16, "stage2": 32, "stage3": 32})
    pruned = tiny_arch.with_widths({"stage1": 8, "stage2": 16, "stage3": 16})
    images = _train_images(quickstart, recipe)
    pair = train_gmacs(wide, wide.widths, 1, images) + train_gmacs(pruned, pruned.widths, 1, images)
    assert train_gmacs(wide, wide.widths, 1, images) > 2 * train_gmacs(pruned, pruned.widths, 1, images)
    assert prune_epochs(None, wide, pruned, recipe, quickstart) == recipe.train.epochs
    assert prune_epochs(4.4 * pair, wide, pruned, recipe, quickstart) == 4
    assert prune_epochs(4.6 * pair, wide, pruned, recipe, quickstart) == 5
    assert prune_epochs(0.2 * pair, wide, pruned, recipe, quickstart) == 1
    assert "prune" in EQUAL_COMPUTE and "flexcharts" not in EQUAL_COMPUTE
