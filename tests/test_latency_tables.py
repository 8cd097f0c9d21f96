"""Latency tables are checked like recipes: a `--latency-table` (or a resumed run's own latency.json) whose numbers
are not finite or out of range, whose `settings` break the recipe's own rules, or that was measured with another
provider, percentile, batch or thread count than the run's recipe is exit 2 with one `error:` line naming the file
and the key (or both values), before anything is written: no run folder, runs/latest unmoved.

One real table is profiled per module (tiny network, cheap timings); the cases are edits of its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from search_fixtures import FAST_SET, TINY_SET, hand_latency_model, sets, single_thread  # noqa: F401
from typer.testing import CliRunner

from flexslim.cli import app
from flexslim.data.sources import load_dataset
from flexslim.errors import BadInput
from flexslim.latency.model import LatencyModel
from flexslim.models.arch import Arch
from flexslim.recipe.schema import load_recipe, recipe_to_toml
from flexslim.system.runs import mark_latest

COMMON = [*sets(*TINY_SET, *FAST_SET, "search.epochs=1", "latency.provider=cpu")]


@pytest.fixture(scope="module")
def table(tmp_path_factory, single_thread) -> dict:  # noqa: F811
    """latency.json of the tiny quickstart network profiled on the CPU provider (the recipe's settings)."""
    root = tmp_path_factory.mktemp("table")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        res = CliRunner().invoke(app, ["profile", "--out", "t.json", *COMMON])
    assert res.exit_code == 0, res.output
    return json.loads((root / "t.json").read_text())


def _edit(d: dict, path: str, value) -> dict:
    """A copy of `d` with the value at `path` (keys and list indices joined by '.') replaced."""
    d = json.loads(json.dumps(d))
    *parents, last = path.split(".")
    node = d
    for k in parents:
        node = node[int(k)] if isinstance(node, list) else node[k]
    node[int(last) if isinstance(node, list) else last] = value
    return d


# (id, key to edit, value, text the error line must contain besides the file)
NUMBER_CASES = [
    ("coef NaN", "coef.0", float("nan"), "coef[0] = nan"),
    ("coef Infinity", "coef.1", float("inf"), "coef[1] = inf"),
    ("coef negative", "coef.0", -1.0, "coef[0] = -1.0"),
    ("intercept NaN", "intercept", float("nan"), "intercept = nan"),
    ("floor Infinity", "floor_ms", float("inf"), "floor_ms = inf"),
    ("floor zero", "floor_ms", 0.0, "floor_ms = 0.0"),
    ("point negative ms", "fit_points.1.ms", -0.5, "fit_points[1].ms = -0.5"),
    ("point NaN p50", "fit_points.0.p50_ms", float("nan"), "fit_points[0].p50_ms = nan"),
    ("hold-out Infinity", "holdout_points.0.ms", float("inf"), "holdout_points[0].ms = inf"),
    ("repeat negative", "fit_points.0.repeats.0", -1.0, "fit_points[0].repeats[0] = -1.0"),
    ("point width zero", "fit_points.2.widths.stage1", 0, "fit_points[2].widths.stage1 = 0"),
    ("budget NaN", "budgets", [float("nan")], "budgets[0] = nan"),
    ("block zero", "block", 0, "block = 0"),
    ("region upside down", "region.stage2", [64, 8], "region.stage2 = [64, 8]"),
    ("hostile near", "settings.near", 100_000, "settings.near = 100000"),
    ("hostile runs", "settings.runs", 10**9, "settings.runs = 1000000000"),
    ("settings NaN min_seconds", "settings.min_seconds", float("nan"), "settings.min_seconds = nan"),
    ("settings samples zero", "settings.samples", 0, "settings.samples = 0"),
    ("settings timeout NaN", "settings.timeout", float("nan"), "settings.timeout = nan"),
    ("settings probe not a switch", "settings.probe", "yes", "settings.probe = 'yes'"),
    ("settings provider", "settings.provider", "tpu", "settings.provider = 'tpu'"),
    ("unknown term", "terms.0", "macs@nowhere", "terms[0] = 'macs@nowhere'"),
]

# (id, key to edit, value, both values as the line names them)
SETTING_CASES = [
    ("provider", "provider", "cuda", "provider cuda (the recipe's latency.provider: cpu)"),
    ("percentile", "settings.percentile", 50.0, "percentile 50 (the recipe's latency.percentile: 90)"),
    ("batch", "settings.batch", 16, "batch 16 (the recipe's latency.batch: 32)"),
    ("threads", "settings.threads", 2, "threads 2 (the recipe's latency.threads: 1)"),
]


def _runs_snapshot(root: Path) -> dict:
    runs = root / "runs"
    if not runs.exists():
        return {}
    latest = runs / "latest"
    return {
        "dirs": sorted(p.name for p in runs.iterdir()),
        "latest": str(latest.resolve()) if latest.exists() else None,
        "files": {str(p): p.read_bytes() for p in runs.rglob("*") if p.is_file() and p.name != ".lock"},
    }


def _refused(root: Path, argv: list[str], *needles: str) -> str:
    """Run the CLI in `root`: exit 2, one `error:` line holding every needle, nothing under runs/ changed."""
    before = _runs_snapshot(root)
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, f"{argv}: exit {res.exit_code}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    text = res.stderr.strip()
    assert "Traceback" not in res.output and "Traceback" not in res.stderr
    assert len(text.splitlines()) == 1 and text.startswith("error:"), text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    assert _runs_snapshot(root) == before, "a rejected table created or changed a run, or moved runs/latest"
    return text


def test_the_profiled_table_passes(table, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    recipe = load_recipe("quickstart", [*TINY_SET, *FAST_SET, "latency.provider=cpu"])
    model = LatencyModel.load(path)
    model.check_compatible(Arch.for_data(recipe.model, load_dataset(recipe.data)), recipe.latency, str(path))
    assert json.loads(json.dumps(model.to_dict()))["fit_points"] == table["fit_points"]


@pytest.mark.parametrize("name, key, value, needle", NUMBER_CASES, ids=[c[0] for c in NUMBER_CASES])
def test_a_table_with_a_bad_number_is_refused(table, tmp_path, name, key, value, needle):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_edit(table, key, value)))  # NaN / Infinity as Python's json writes them
    with pytest.raises(BadInput) as err:
        LatencyModel.load(path)
    assert str(path) in str(err.value) and needle in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, key, value, needle", NUMBER_CASES[:1] + NUMBER_CASES[6:7] + NUMBER_CASES[14:15])
def test_search_with_a_bad_table_is_exit_2_before_any_run(table, tmp_path, monkeypatch, name, key, value, needle):
    """NaN coefficient, negative point, hostile `near`: through the CLI, nothing written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEXSLIM_LOG_DIR", str(tmp_path / "logs"))
    Path("bad.json").write_text(json.dumps(_edit(table, key, value)))
    argv = ["search", "--latency-ms", "1", "--latency-table", "bad.json", *COMMON, "--no-retrain"]
    _refused(tmp_path, argv, "bad.json", needle)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("name, key, value, both", SETTING_CASES, ids=[c[0] for c in SETTING_CASES])
def test_a_table_measured_with_other_settings_is_exit_2_naming_both(
    table, tmp_path, monkeypatch, name, key, value, both
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEXSLIM_LOG_DIR", str(tmp_path / "logs"))
    Path("other.json").write_text(json.dumps(_edit(table, key, value)))
    argv = ["search", "--latency-ms", "1", "--latency-table", "other.json", *COMMON, "--no-retrain"]
    _refused(tmp_path, argv, "other.json", both)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()


def test_a_mismatched_table_does_not_move_runs_latest(table, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "runs" / "old"
    old.mkdir(parents=True)
    mark_latest(old)
    Path("other.json").write_text(json.dumps(_edit(table, "settings.batch", 16)))
    argv = ["search", "--latency-ms", "1", "--latency-table", "other.json", *COMMON, "--no-retrain"]
    _refused(tmp_path, argv, "batch 16")
    assert (tmp_path / "runs" / "latest").resolve() == old.resolve()


def test_a_resumed_runs_own_bad_latency_json_is_exit_2_before_the_run_is_touched(table, tmp_path, monkeypatch):
    """The run's own latency.json is read back through the same checks, before run.json or runs/latest change."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    recipe = load_recipe("quickstart", [*TINY_SET, *FAST_SET, "search.epochs=1", "latency.provider=cpu"])
    (run / "recipe.toml").write_text(recipe_to_toml(recipe))
    (run / "run.json").write_text(json.dumps({"budget_ms": 1.0, "status": "started"}))
    (run / "latency.json").write_text(json.dumps(_edit(table, "settings.near", 100_000)))
    other = tmp_path / "runs" / "other"
    other.mkdir()
    mark_latest(other)
    argv = ["search", "--latency-ms", "1", "--resume", "--run-dir", str(run), "--no-retrain"]
    _refused(tmp_path, argv, str(run / "latency.json"), "settings.near = 100000")


def test_a_hand_made_table_without_points_loads(tmp_path):
    """A table made by hand (known coefficients, no measured points, a region up to the width cap) is valid: the
    run measures near its budget. tests/test_distributed.py hands such a table to torchrun searches."""
    recipe = load_recipe("quickstart", list(TINY_SET))
    arch = Arch.for_data(recipe.model, load_dataset(recipe.data))
    hand = hand_latency_model(arch, recipe.latency)
    loaded = LatencyModel.load(hand.save(tmp_path / "hand.json"))
    loaded.check_compatible(arch, recipe.latency, "hand.json")
    assert loaded.to_dict() == hand.to_dict() and not loaded.fit_points
    assert float(loaded.predict(arch.widths)) == float(hand.predict(arch.widths))
