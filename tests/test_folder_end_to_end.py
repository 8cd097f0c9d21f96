"""End to end on a user's image folder, per torchvision family: `search` (tiny widths, 2 epochs, 1 retrain epoch)
-> `export` (gated against the budget) -> `validate --data DIR/val` (accuracy on the folder, class names from the
model's metadata)."""

from __future__ import annotations

import json
import time

import onnx
import pytest
from folder_fixtures import NAMES, write_digits_folder
from typer.testing import CliRunner

from flexslim.cli import app

BUDGET_MS = 2.0  # per sample; the tiny networks measure ~0.1-0.5 ms on a 2-core CPU
FAST = {
    "data.image_size": "32",
    "data.mean": "[]",  # the digits' own statistics, not ImageNet's
    "data.std": "[]",
    "model.min_width": "4",
    "model.round_to": "4",
    "search.epochs": "2",
    "search.batch_size": "64",
    "search.lr": "0.05",
    "search.sigma": "2.0",
    "search.arch_lr": "1.0",
    "train.epochs": "1",
    "train.batch_size": "64",
    "train.lr": "0.05",
    "latency.provider": "cpu",
    "latency.threads": "1",
    "latency.samples": "5",
    "latency.repeats": "1",
    "latency.probe": "false",
    "latency.near": "1",
    "latency.holdout": "2",
    "latency.runs": "10",
    "latency.warmup": "2",
    "latency.min_seconds": "0",
    "latency.bake_seconds": "0",
    "search.trim": "false",  # 2 ms is far over these networks: the measured bake (test_bake) would grow ~15 each
}


def _stages(*rows) -> str:
    return "[" + ", ".join(f'{{ name = "{n}", width = {w}, blocks = 1, stride = {s} }}' for n, w, s in rows) + "]"


SMALL = {
    "imagenet-resnet18": {
        "model.stages": _stages(("layer1", 8, 1), ("layer2", 8, 2), ("layer3", 16, 2), ("layer4", 16, 2))
    },
    "imagenet-resnet50": {
        "model.stages": _stages(("layer1", 4, 1), ("layer2", 8, 2), ("layer3", 8, 2), ("layer4", 8, 2))
    },
    "imagenet-mobilenetv2": {
        "model.stem_width": "8",
        "model.head_width": "64",
        "model.stages": _stages(
            ("stage1", 8, 1), ("stage2", 8, 2), ("stage3", 8, 2), ("stage4", 16, 2), ("stage5", 16, 1)
        ),
    },
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp("digits"))


def _ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(SMALL))
def test_search_export_validate_on_an_image_folder(recipe, digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = CliRunner()
    sets = [a for k, v in {**FAST, **SMALL[recipe]}.items() for a in ("--set", f"{k}={v}")]
    t0 = time.perf_counter()
    _ok(
        cli.invoke(
            app,
            [
                "search",
                "--latency-ms",
                str(BUDGET_MS),
                "--recipe",
                recipe,
                "--data",
                str(digits),
                "--device",
                "cpu",
                *sets,
            ],
        )
    )
    _ok(cli.invoke(app, ["export", "model.onnx"]))
    res = _ok(
        cli.invoke(
            app,
            [
                "validate",
                "model.onnx",
                "--data",
                str(digits / "val"),
                "--report",
                "r.json",
                "--runs",
                "5",
                "--warmup",
                "1",
                "--min-seconds",
                "0",
            ],
        )
    )
    seconds = time.perf_counter() - t0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["latency_ms"] <= BUDGET_MS and report["dataset"] == "folder"
    assert report["num_test"] == 100 and 0 <= report["accuracy"] <= 1, res.stdout
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(meta["flexslim.class_names"]) == sorted(NAMES) and meta["flexslim.dataset"] == "folder"
    run = json.loads((tmp_path / "runs" / "latest" / "arch.json").read_text())
    assert run["class_names"] == sorted(NAMES) and run["family"] == meta["flexslim.family"]
    print(f"{recipe}: search -> export -> validate in {seconds:.1f} s, p90 {report['latency_ms']:.4f} ms")
