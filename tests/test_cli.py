import copy
import json
import subprocess
import sys

import onnx
import pytest

from flexslim.cli import app
from flexslim.recipe.schema import load_recipe, stage_widths

FAST_ARGS = ["--runs", "5", "--warmup", "1", "--min-seconds", "0"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_help(cli):
    res = cli.invoke(app, ["--help"])
    assert res.exit_code == 0, res.output
    for command in ("train", "export", "validate"):
        assert command in res.stdout
    for command in ("train", "export", "validate"):
        sub = cli.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and "Usage" in sub.stdout


def test_import_of_the_cli_stays_light():
    """`flexslim --help` must be fast: importing the CLI may not pull in torch, onnx or onnxruntime."""
    code = (
        "import sys, flexslim.cli.commands\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'torchvision', 'sklearn', 'matplotlib') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported at CLI import time: {proc.stdout.strip()}"


def test_train_export_validate_end_to_end(in_tmp, cli, monkeypatch):
    res = cli.invoke(app, ["train", "--epochs", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    latest = in_tmp / "runs" / "latest"
    assert {"model.pt", "arch.json", "recipe.toml"} <= {p.name for p in latest.iterdir()}
    assert not (latest / "train_state.pt").exists()
    assert "test accuracy" in res.stdout

    res = cli.invoke(app, ["export", "out.onnx"])
    assert res.exit_code == 0, res.output
    assert (in_tmp / "out.onnx").is_file()
    assert "parity max" in res.stdout and "gate skipped" in res.stdout  # a trained run has no budget
    meta = {p.key: p.value for p in onnx.load(str(in_tmp / "out.onnx")).metadata_props}
    assert meta["flexslim.recipe"] == "quickstart" and meta["flexslim.dataset"] == "quickstart"
    quickstart = load_recipe("quickstart")
    assert json.loads(meta["flexslim.widths"]) == stage_widths(quickstart.model)

    res = cli.invoke(app, ["validate", "out.onnx", "--latency-ms", "100", "--report", "r.json", *FAST_ARGS])
    assert res.exit_code == 0, res.output
    report = json.loads((in_tmp / "r.json").read_text())
    assert report["passed"] and report["provider"] == "cpu" and report["batch"] == quickstart.latency.batch
    assert report["dataset"] is None and report["accuracy"] is None  # latency only: the metadata's dataset unread

    # the later exports are of the same trained model: reuse its graph instead of re-running the slow dynamo
    # export (parity with torch and the metadata are still checked and written for real)
    from flexslim.deploy import export as export_mod

    graph = onnx.load(str(in_tmp / "out.onnx"))
    monkeypatch.setattr(export_mod, "_dynamo_proto", lambda model, sample: copy.deepcopy(graph))

    # a run with a budget (as `search` records it): export gates the model against it and records it
    (latest / "run.json").write_text(json.dumps({"budget_ms": 100.0, "latency": {"provider": "cpu", "batch": 8}}))
    res = cli.invoke(app, ["export", "gated.onnx", "--run-dir", str(latest)])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.stdout
    meta = {p.key: p.value for p in onnx.load(str(in_tmp / "gated.onnx")).metadata_props}
    assert float(meta["flexslim.budget_ms"]) == 100.0 and meta["flexslim.latency_batch"] == "8"
    # validate reads the budget and batch back from the metadata
    res = cli.invoke(app, ["validate", "gated.onnx", "--report", "g.json", *FAST_ARGS])
    assert res.exit_code == 0, res.output
    report = json.loads((in_tmp / "g.json").read_text())
    assert report["budget_ms"] == 100.0 and report["batch"] == 8 and report["checks"][0]["name"] == "latency"

    # an impossible budget: the model is written, the gate fails with exit 1
    (latest / "run.json").write_text(json.dumps({"budget_ms": 1e-6, "latency": {"provider": "cpu", "batch": 8}}))
    res = cli.invoke(app, ["export", "slow.onnx"])
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.stdout and "1e-06" in res.stdout and (in_tmp / "slow.onnx").is_file()

    # --no-validate skips the gate; a non-.onnx output is bad input
    res = cli.invoke(app, ["export", "plain.onnx", "--no-validate"])
    assert res.exit_code == 0 and "gate skipped (--no-validate)" in res.stdout and "PASS" not in res.stdout
    res = cli.invoke(app, ["export", "model.bin"])
    assert res.exit_code == 2 and ".onnx" in res.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--recipe", "nosuch-recipe"], "nosuch-recipe"),
        (["train", "--set", "nosuch.key=1"], "nosuch"),
        (["train", "--set", "train.nosuch=1"], "nosuch"),
        (["train", "--set", "train.epochs=abc"], "train.epochs"),
        (["train", "missing_arch.json"], "missing_arch.json"),
        (["train", "--recipe", "missing.toml"], "missing.toml"),
        (["export", "out.onnx"], "--run-dir"),  # no runs yet
        (["export", "out.onnx", "--run-dir", "nowhere"], "nowhere"),
        (["validate", "missing.onnx"], "missing.onnx"),
    ],
)
def test_bad_input_exits_2_with_one_line(in_tmp, cli, one_line_error, args, needle):
    res = cli.invoke(app, args)
    assert res.exit_code == 2, res.output
    line = one_line_error(res)
    assert line.startswith("error:") and needle in line
    assert not (in_tmp / "runs").exists()  # nothing half-made


def test_bad_arch_file_exits_2(in_tmp, cli, one_line_error):
    (in_tmp / "arch.json").write_text('{"version": 1, "family": "resnet"')
    res = cli.invoke(app, ["train", "arch.json"])
    assert res.exit_code == 2
    assert "not valid JSON" in one_line_error(res)


def test_corrupt_model_pt_exits_2(in_tmp, cli, one_line_error, tiny_arch):
    from flexslim.models.arch import arch_json

    run = in_tmp / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "arch.json").write_text(arch_json(tiny_arch))
    (run / "model.pt").write_bytes(b"\x00garbage")
    res = cli.invoke(app, ["export", "out.onnx", "--run-dir", str(run)])
    assert res.exit_code == 2
    assert "model.pt" in one_line_error(res)
    assert not (in_tmp / "out.onnx").exists()


def test_flexslim_console_script_help():
    """The installed entry point answers --help (a fresh process, as a user runs it)."""
    proc = subprocess.run(
        [sys.executable, "-c", "from flexslim.cli import app; app()", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "validate" in proc.stdout and "Traceback" not in proc.stderr


def test_search_pretrained_must_be_a_file(in_tmp, cli):
    res = cli.invoke(app, ["search", "--latency-ms", "1", "--pretrained", "missing.pth", "--no-retrain"])
    assert res.exit_code == 2 and "--pretrained" in res.stderr and "Traceback" not in res.output
    assert not (in_tmp / "runs").exists()
