"""`flexslim search` and `flexslim profile` through the CLI (typer's CliRunner, in a temporary folder):
the run directory's files, the floor error, --resume, --latency-table, and one end-to-end run that is
exported and gated with `export` and `validate`."""

import json
from types import SimpleNamespace

import pytest
import torch
from search_fixtures import FAST_SET, HISTORY_FIELDS, TINY_SET, error_line, sets, single_thread  # noqa: F401
from typer.testing import CliRunner

from flexslim.cli import app
from flexslim.latency.model import LatencyModel
from flexslim.models.arch import load_arch
from flexslim.recipe.schema import load_recipe

SEARCH_EPOCHS = 2
COMMON = sets(*TINY_SET, *FAST_SET, f"search.epochs={SEARCH_EPOCHS}")
LINE_FIELDS = HISTORY_FIELDS


def _forbid(name):
    def boom(*args, **kwargs):
        raise AssertionError(f"{name} must not run here")

    return boom


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`profile --out t.json`, then `search --latency-table t.json --no-retrain` (2 epochs, tiny network) in a
    fresh folder, with the initial profile forbidden during the search (the table must be reused)."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        prof = ok(invoke("profile", "--out", "t.json", *COMMON))
        table = json.loads((root / "t.json").read_text())
        budget = round(5 * table["floor_ms"], 4)  # binding for a grown network, far above the floor's noise
        mp.setattr("flexslim.jobs.latency.profile", _forbid("profiling"))
        res = ok(invoke("search", "--latency-ms", str(budget), "--latency-table", "t.json", *COMMON, "--no-retrain"))
    run_dir = (root / "runs" / "latest").resolve()
    return SimpleNamespace(root=root, profile=prof, table=table, budget=budget, result=res, run_dir=run_dir)


# -- profile -------------------------------------------------------------------------------------------------
def test_profile_writes_a_latency_table(run):
    t = run.table
    assert t["key"]["provider"] == "cpu" and t["key"]["batch"] == 32 and t["key"]["threads"] == 1
    assert len(t["fit_points"]) == 5 and len(t["holdout_points"]) == 2
    assert t["floor_ms"] > 0 and set(t["error"]) == {"holdout", "median_pct", "max_pct", "noise_pct"}
    model = LatencyModel.load(run.root / "t.json")
    assert model.arch.widths == {"stage1": 8, "stage2": 16, "stage3": 16}
    assert "wrote t.json" in run.profile.stdout and "floor" in run.profile.stdout


# -- search: the run directory --------------------------------------------------------------------------------
def test_search_writes_the_run_directory(run):
    d = run.run_dir
    assert d.parent == (run.root / "runs").resolve() and d.name.endswith("-quickstart")
    for name in ("run.json", "latency.json", "search.jsonl", "search.png", "arch.json", "recipe.toml"):
        assert (d / name).is_file(), name
    assert not (d / "model.pt").exists(), "--no-retrain stops before retraining"
    assert not (d / "search_state.pt").exists(), "the resume checkpoint goes once the search is finished"
    assert "next: flexslim train" in run.result.stdout


def test_run_json_records_budget_widths_and_measurement(run):
    info = json.loads((run.run_dir / "run.json").read_text())
    assert info["status"] == "searched" and info["budget_ms"] == run.budget and info["method"] == "flexcharts"
    arch = load_arch(run.run_dir / "arch.json")
    assert info["widths"] == arch.widths
    assert all(w % 8 == 0 and w >= 8 for w in arch.widths.values())
    b = info["budget"]
    assert b["ms"] == run.budget and b["low_ms"] == pytest.approx(0.9 * run.budget) and b["limit_ms"] < run.budget
    assert info["measured_ms"] <= b["limit_ms"] and info["budget_met"]
    assert info["latency"]["provider"] == "cpu" and info["latency"]["floor_ms"] == run.table["floor_ms"]
    assert info["latency"]["timeout"] == 600.0  # latency.timeout, for the gate of `flexslim export`
    # the bake's log: every measured network, the delivered one among those that measured within the limit
    steps = info["bake"]
    assert steps and all(s["step"] in ("choose", "trim", "grow", "grow-rejected", "exchange", "confirm") for s in steps)
    at = [i for i, s in enumerate(steps) if s["step"] == "confirm"]  # chosen among several measured: timed again
    assert (len(steps) == 1) if not at else 1 <= at[0] and len(at) <= 3  # CONFIRMS: each trimmed one in turn
    after = {s["step"] for s in steps[at[0] :]} if at else set()
    # after a confirmation: trims, and the growths of a fallback under the window; the delivered network timed last
    assert not at or steps[-1]["widths"] == info["widths"] and after <= {"trim", "confirm", "grow", "grow-rejected"}
    assert not at or steps[-1]["step"] in ("confirm", "trim")
    kept = [s for s in steps if s["widths"] == info["widths"]]
    assert kept and kept[-1]["measured_ms"] == info["measured_ms"] <= b["limit_ms"]
    assert all(s["measured_ms"] > b["limit_ms"] for s in steps if s["step"] == "grow-rejected")
    assert info["in_window"] == (b["low_ms"] <= info["measured_ms"] <= b["ms"])
    assert info["in_window"] or info["window_note"]  # below the window: the note names the straddling networks
    assert info["search_seconds"] > 0 and info["latency_seconds"] >= info["bake_seconds"] > 0


def test_search_jsonl_has_one_documented_line_per_epoch(run):
    lines = [json.loads(x) for x in (run.run_dir / "search.jsonl").read_text().splitlines()]
    assert len(lines) == SEARCH_EPOCHS
    assert [h["epoch"] for h in lines] == list(range(1, SEARCH_EPOCHS + 1))
    stages = {"stage1", "stage2", "stage3"}
    for h in lines:
        assert LINE_FIELDS <= set(h), LINE_FIELDS - set(h)
        assert set(h["mu"]) == set(h["allocated"]) == set(h["sigma"]) == stages
        assert h["budget_ms"] == run.budget and h["expected_latency_ms"] > 0 and h["seconds"] > 0
    info = json.loads((run.run_dir / "run.json").read_text())
    # the bake starts from mu averaged over the last steps, each stage rounded down or up to the grid
    assert info["searched_widths"] == lines[-1]["mu_avg"]
    step = 8  # round_to = 0 (auto): the probe is off here, so the grid is its floor of 8 channels
    for s in (s for s in info["bake"] if s["step"] == "choose"):
        for stage, width in s["widths"].items():
            center = info["searched_widths"][stage]
            assert width == 8 or (width % step == 0 and abs(width - center) < step), (stage, width, center)


def test_search_png_is_a_png(run):
    data = (run.run_dir / "search.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_recipe_toml_is_the_resolved_recipe(run):
    recipe = load_recipe(str(run.run_dir / "recipe.toml"))
    assert recipe.search.epochs == SEARCH_EPOCHS and recipe.latency.samples == 5 and recipe.model.stem_width == 8


def test_baked_supernet_weights_are_saved_for_users_who_skip_retraining(run):
    from flexslim.train.checkpoint import load_model

    arch, model, _ = load_model(run.run_dir / "supernet_baked.pt")
    assert arch.widths == load_arch(run.run_dir / "arch.json").widths
    with torch.no_grad():
        assert model(torch.rand(2, *arch.input_shape)).shape == (2, 10)


def test_latency_table_is_reused_not_remeasured(run):
    """latency.json is the table itself, plus only the points measured near the budget before the search
    (latency.near = 1 here: at most one fit and one hold-out network) and, where the budget lay beyond the table's
    box, the box's growth (each doubling: its top and a few networks of the grown box, `profiling._reach`);
    nothing is measured during the search."""
    from flexslim.latency.profiling import EXTENSIONS

    lat = json.loads((run.run_dir / "latency.json").read_text())
    t = run.table
    n, h = len(t["fit_points"]), len(t["holdout_points"])
    assert lat["fit_points"][:n] == t["fit_points"] and lat["holdout_points"][:h] == t["holdout_points"]
    assert lat["floor_ms"] == t["floor_ms"] and lat["key"] == t["key"] and lat["block"] == t["block"]
    tops = [{s: hi for s, (_, hi) in r.items()} for r in (t["region"], lat["region"])]
    grown = 0
    while tops[0] != tops[1] and grown < EXTENSIONS:  # count the doublings between the two tops
        tops[0] = {s: w * 2 for s, w in tops[0].items()}
        grown += 1
    assert tops[0] == tops[1] or all(tops[0][s] >= w for s, w in tops[1].items())  # (a top capped at MAX_WIDTH)
    per_growth = 1 + max(2, run.table["settings"]["samples"] // 4)
    assert len(lat["fit_points"]) - n <= 1 + grown * per_growth and len(lat["holdout_points"]) - h <= 1
    assert not grown or tops[1] in [q["widths"] for q in lat["fit_points"]]  # the grown top was measured
    assert run.budget in lat["budgets"]


# -- search: errors and --resume -----------------------------------------------------------------------------
def test_budget_below_the_floor_is_exit_2_naming_the_floor(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("flexslim.search.loop.run_search", _forbid("the search"))
    res = invoke("search", "--latency-ms", "1e-6", *COMMON, "--no-retrain")
    assert res.exit_code == 2, res.output
    line = error_line(res)
    info = json.loads((tmp_path / "runs" / "latest" / "run.json").read_text())
    assert info["status"] == "impossible budget"
    floor = info["latency"]["floor_ms"]
    assert "floor" in line and f"{floor:.4f} ms" in line and "min_width 8" in line and "1e-06" in line


def test_resume_of_a_finished_run_does_not_search_again(run, monkeypatch):
    monkeypatch.chdir(run.root)
    before = {p.name: p.read_bytes() for p in run.run_dir.iterdir() if p.suffix in (".jsonl", ".png", ".pt")}
    arch_before = load_arch(run.run_dir / "arch.json")
    info_before = json.loads((run.run_dir / "run.json").read_text())
    for target in ("flexslim.search.loop.run_search", "flexslim.jobs.search.bake", "flexslim.jobs.latency.profile"):
        monkeypatch.setattr(target, _forbid(target))
    res = ok(invoke("search", "--latency-ms", str(run.budget), "--resume", "--no-retrain"))
    after = {p.name: p.read_bytes() for p in run.run_dir.iterdir() if p.suffix in (".jsonl", ".png", ".pt")}
    assert after == before
    assert load_arch(run.run_dir / "arch.json") == arch_before
    assert str(arch_before.widths) in res.stdout
    assert "search already finished" in res.stderr
    info = json.loads((run.run_dir / "run.json").read_text())  # what the search recorded is kept
    for key in ("status", "budget_ms", "widths", "searched_widths", "measured_ms", "trims", "latency"):
        assert info[key] == info_before[key], key


def test_resume_with_another_budget_is_refused(run, monkeypatch):
    monkeypatch.chdir(run.root)
    res = invoke("search", "--latency-ms", str(run.budget * 2), "--resume", "--no-retrain")
    assert res.exit_code == 2
    assert "start a new run" in error_line(res)


def test_a_run_directory_is_not_overwritten(run, monkeypatch):
    monkeypatch.chdir(run.root)
    res = invoke("search", "--latency-ms", str(run.budget), "--run-dir", str(run.run_dir), *COMMON, "--no-retrain")
    assert res.exit_code == 2
    assert "--resume" in error_line(res)


def test_a_table_from_another_structure_is_refused(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = sets(*FAST_SET, f"search.epochs={SEARCH_EPOCHS}")  # the recipe's own stem (16) and stages, not tiny's
    res = invoke("search", "--latency-ms", "1", "--latency-table", str(run.root / "t.json"), *other, "--no-retrain")
    assert res.exit_code == 2
    assert "another network structure" in error_line(res)


@pytest.mark.parametrize("budget", ["0", "-1"])
def test_non_positive_budget_is_bad_input(budget, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("search", f"--latency-ms={budget}", "--no-retrain")
    assert res.exit_code == 2
    assert "--latency-ms" in error_line(res)
    assert not (tmp_path / "runs").exists()


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_search_retrain_export_validate_end_to_end(tmp_path, monkeypatch):
    """The README path on the quickstart recipe (shortened): search + retrain, export (gated), validate."""
    monkeypatch.chdir(tmp_path)
    budget = "1.0"  # loose: timing noise on a shared CPU must not fail the gate
    # the bake measures its first choice only: the fill toward a loose budget (16 networks) has its own tests
    args = sets(*FAST_SET, "search.epochs=2", "train.epochs=2", "search.trim=false")
    res = ok(invoke("search", "--latency-ms", budget, *args))
    run_dir = (tmp_path / "runs" / "latest").resolve()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "done" and 0 <= info["test_acc"] <= 1
    assert (run_dir / "model.pt").is_file() and "test accuracy" in res.stdout
    assert "next: flexslim export model.onnx" in res.stdout
    assert info["onnx"]["file"] == "model.onnx" and (run_dir / "model.onnx").is_file()  # the search's own export

    with monkeypatch.context() as mp:  # export copies it: no second conversion
        mp.setattr("flexslim.jobs.export.export_model", _forbid("the exporter"))
        res = ok(invoke("export", "model.onnx"))
    assert "the search's conversion, copied from" in res.stdout
    assert (tmp_path / "model.onnx").read_bytes() == (run_dir / "model.onnx").read_bytes()

    res = ok(invoke("validate", "model.onnx", "--report", "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["budget_ms"] == float(budget)  # read back from the model's metadata
    assert "PASS" in res.stdout

    # --resume on a finished run redoes neither the search nor the retraining
    model_pt = (run_dir / "model.pt").read_bytes()
    for target in (
        "flexslim.search.loop.run_search",
        "flexslim.jobs.train.train_arch",
        "flexslim.jobs.latency.profile",
        "flexslim.jobs.export.export_model",  # the run's export is current: not converted again
    ):
        monkeypatch.setattr(target, _forbid(target))
    res = ok(invoke("search", "--latency-ms", budget, "--resume"))
    assert (run_dir / "model.pt").read_bytes() == model_pt
    assert f"test accuracy {info['test_acc']:.4f}" in res.stdout
    assert json.loads((run_dir / "run.json").read_text())["status"] == "done"


# -- train.init = searched ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["searched", "auto"])
def test_train_init_searched_fine_tunes_from_exactly_the_searched_weights(run, tmp_path, monkeypatch, init):
    """`flexslim train RUN --set train.init=searched` (and the default, auto, on a search run): the network that
    enters the first epoch is supernet_baked.pt
    (the searched supernet sliced to the baked widths, BatchNorm recalibrated) tensor for tensor - an oracle: it
    computes what the searched network computes - and training goes on from there into model.pt."""
    import shutil

    import flexslim.jobs.train as train_job
    from flexslim.train.checkpoint import load_model

    run_dir = tmp_path / "run"
    shutil.copytree(run.run_dir, run_dir)
    _, searched, payload = load_model(run_dir / "supernet_baked.pt")
    entered = {}
    real_fit = train_job.fit

    def spy(model, *args, **kwargs):
        entered.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        model.eval()
        x = torch.rand(4, *load_arch(run_dir / "arch.json").input_shape)
        with torch.no_grad():
            entered["__out__"], entered["__oracle__"] = model(x), searched(x)
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(train_job, "fit", spy)
    ok(invoke("train", str(run_dir), "--epochs", "1", *sets(f"train.init={init}", "train.batch_size=64")))
    assert set(payload["state_dict"]) <= set(entered)
    assert all(torch.equal(entered[k], v) for k, v in payload["state_dict"].items())
    assert torch.equal(entered["__out__"], entered["__oracle__"])
    assert (run_dir / "model.pt").is_file()


def test_train_init_searched_without_searched_weights_is_one_line_exit_2(run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(run.run_dir, run_dir)
    (run_dir / "supernet_baked.pt").unlink()
    res = invoke("train", str(run_dir), "--epochs", "1", *sets("train.init=searched"))
    assert res.exit_code == 2 and "train.init = searched" in error_line(res) and "supernet_baked.pt" in error_line(res)
    ok(invoke("train", str(run_dir), "--epochs", "1", *sets("train.init=auto")))  # auto without them: from scratch
