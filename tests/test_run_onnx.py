"""The search's own release export (`jobs.export.write_run_onnx`, run/model.onnx) and `export` copying it: only
when it was made from the model.pt the run holds now, with the metadata the export would write, unchanged since."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import pytest

from flexslim.jobs import export as job
from flexslim.system.runs import RunRecord

RUN_LATENCY = {"provider": "cpu", "batch": 4, "threads": 1, "percentile": 90.0, "timeout": 600.0}


def _forbid(name):
    def boom(*args, **kwargs):
        raise AssertionError(f"{name} must not run here")

    return boom


@pytest.fixture
def run(tiny_run) -> Path:
    """A run folder with the tiny model.pt, a run.json (budget 1000 ms) and a recipe.toml (`conftest.tiny_run`)."""
    return tiny_run(RUN_LATENCY, [])


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_the_runs_own_export_records_model_pts_sha256_and_export_copies_it_without_converting(run, monkeypatch):
    """write_run_onnx converts once (run/model.onnx, recorded in run.json); export_run then writes the same bytes
    without the exporter and without loading model.pt into torch, reporting the recorded parity."""
    from flexslim.system.files import file_sha256

    written = job.write_run_onnx(run, RunRecord.load(run))
    record = RunRecord.load(run)["onnx"]
    assert record["sha256"] == file_sha256(run / "model.onnx") and record["opset"] == written.opset
    assert _metadata(run / "model.onnx")["flexslim.model_sha256"] == file_sha256(run / "model.pt")
    assert job.run_onnx_current(run, RunRecord.load(run))

    monkeypatch.setattr(job, "export_model", _forbid("the exporter"))
    monkeypatch.setattr("flexslim.train.checkpoint.load_model", _forbid("loading model.pt"))
    res = job.export_run("out.onnx", run, gate=False)
    assert Path("out.onnx").read_bytes() == (run / "model.onnx").read_bytes()
    assert res.export.parity_max_abs == written.parity_max_abs and res.export.opset == written.opset
    assert res.export.size_bytes == Path("out.onnx").stat().st_size and res.export.copied_from == run / "model.onnx"


def _converted_instead(monkeypatch) -> list:
    calls = []
    real = job.export_model

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "export_model", spy)
    return calls


def test_a_retrained_model_pt_is_converted_again_not_copied(
    run, monkeypatch, tiny_arch, tiny_model, randomize_batchnorm
):
    """model.pt replaced after the search's export (another sha256): export converts it, and the file carries the
    new sha256; the run's export is no longer current."""
    from flexslim.recipe.schema import load_recipe
    from flexslim.system.files import file_sha256
    from flexslim.train.checkpoint import save_model

    job.write_run_onnx(run, RunRecord.load(run))
    save_model(run / "model.pt", tiny_arch, copy.deepcopy(tiny_model), load_recipe("quickstart"), {"epochs": 1})
    assert not job.run_onnx_current(run, RunRecord.load(run))
    calls = _converted_instead(monkeypatch)
    res = job.export_run("out.onnx", run, gate=False)
    assert len(calls) == 1 and res.export.copied_from is None
    assert _metadata(Path("out.onnx"))["flexslim.model_sha256"] == file_sha256(run / "model.pt")


@pytest.mark.parametrize("change", ["onnx bytes", "budget", "record", "parity"])
def test_an_export_that_does_not_match_is_converted_again(run, monkeypatch, change):
    """run/model.onnx edited after it was recorded, a run.json whose budget (hence metadata) changed, a recorded
    parity that is not a number or beyond the tolerance: converted, never copied."""
    job.write_run_onnx(run, RunRecord.load(run))
    data = json.loads((run / "run.json").read_text())
    if change == "onnx bytes":
        (run / "model.onnx").write_bytes((run / "model.onnx").read_bytes() + b"\0")
    elif change == "budget":
        data["budget_ms"] = 2000.0
    elif change == "record":
        data["onnx"]["parity_max_abs"] = "small"
    else:
        data["onnx"]["parity_max_abs"] = 0.5  # beyond the parity tolerance
    (run / "run.json").write_text(json.dumps(data))
    calls = _converted_instead(monkeypatch)
    job.export_run("out.onnx", run, gate=False)
    assert len(calls) == 1
    assert Path("out.onnx").read_bytes() != (run / "model.onnx").read_bytes() or change in ("record", "parity")


def test_export_over_the_runs_own_file_keeps_it(run, monkeypatch):
    """`flexslim export runs/latest/model.onnx`: the file is its own copy, left as it is."""
    job.write_run_onnx(run, RunRecord.load(run))
    before = (run / "model.onnx").read_bytes()
    monkeypatch.setattr(job, "export_model", _forbid("the exporter"))
    job.export_run(run / "model.onnx", run, gate=False)
    assert (run / "model.onnx").read_bytes() == before


def test_retraining_removes_the_runs_export_of_the_old_model(run, tiny_arch, monkeypatch):
    """train_arch rewrites model.pt: the run's model.onnx of the old one goes with it."""
    from flexslim.data.sources import load_dataset
    from flexslim.jobs.train import train_arch
    from flexslim.recipe.schema import load_recipe

    job.write_run_onnx(run, RunRecord.load(run))
    recipe = load_recipe("quickstart", ["train.epochs=1", "data.train_subset=5", "train.init=scratch"])
    import torch

    train_arch(tiny_arch, recipe, run, load_dataset(recipe.data), torch.device("cpu"))
    assert not (run / "model.onnx").exists() and not job.run_onnx_current(run, RunRecord.load(run))
