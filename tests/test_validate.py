import dataclasses
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import flexslim
from flexslim.cli import app
from flexslim.deploy.gate import Measurement, Report, validate
from flexslim.errors import BadInput

FAST_TIMING = {"runs": 5, "warmup": 1, "min_seconds": 0.0}
FAST = {"measure": Measurement(**FAST_TIMING)}


def fast(**settings) -> dict:
    """validate() keyword arguments: quick timing with these measurement settings (batch, percentile, threads)."""
    return {"measure": Measurement(**FAST_TIMING, **settings)}


FAST_ARGS = ["--runs", "5", "--warmup", "1", "--min-seconds", "0"]
REPORT_KEYS = {"provider", "batch", "input_shape", "p50_ms", "p90_ms", "runtime", "timed_runs"}


# ---------------------------------------------------------------- library call


def test_library_call_returns_a_report(exported):
    rep = flexslim.validate(exported.path, latency_ms=1000.0, **FAST)
    assert isinstance(rep, Report)
    assert rep.passed
    assert rep.timing.provider == "cpu" and rep.timing.runs == 5 and rep.timing.warmup == 1
    (check,) = [c for c in rep.checks if c.name == "latency"]
    assert check.passed and check.limit == 1000.0 and check.unit == "ms"
    assert check.measured == rep.latency_ms == rep.timing.at_percentile_ms == rep.timing.p90_ms  # p90 by default
    assert rep.summary().startswith("PASS")


def test_library_call_works_repeatedly_in_a_fresh_process(torchvision_onnx):
    """`flexslim.validate` stays the function once the gate module `flexslim.deploy.gate` is imported too."""
    code = (
        "import flexslim, sys\n"
        "from flexslim.deploy.gate import Measurement\n"
        "m = Measurement(runs=2, warmup=0, min_seconds=0)\n"
        "for _ in range(2):\n"
        f"    rep = flexslim.validate({str(torchvision_onnx)!r}, latency_ms=1e4, measure=m)\n"
        "    assert rep.passed and rep.timing.provider == 'cpu'\n"
        "import flexslim.deploy.gate\n"
        "from flexslim.errors import BadInput\n"
        "try:\n"
        f"    flexslim.validate({str(torchvision_onnx)!r}, measure=m)\n"
        "except BadInput as err:\n"
        "    assert str(err).startswith('nothing to check'), err\n"
        "else:\n"
        "    sys.exit('no checks, and no error')\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_settings_from_metadata(exported):
    """Batch and threads come from the flexslim.* metadata when no argument names them; the dataset too, but only
    when accuracy is asked for (a latency-only gate touches no dataset)."""
    rep = validate(exported.path, latency_ms=1000.0, **FAST)
    assert rep.timing.batch == 4 and rep.timing.input_shape == (4, 1, 16, 16)
    assert rep.timing.threads == 1
    assert rep.dataset is None and rep.accuracy is None and rep.num_test == 0  # not asked for
    assert rep.from_metadata == {"percentile": 90.0, "threads": 1, "batch": 4}
    rep = validate(exported.path, latency_ms=1000.0, min_accuracy=0.0, **FAST)
    assert rep.dataset == "quickstart" and rep.num_test == 360 and rep.from_metadata["dataset"] == "quickstart"
    rep = validate(exported.path, latency_ms=1000.0, **fast(batch=2, percentile=50.0, threads=0))  # arguments win
    assert rep.timing.batch == 2 and rep.timing.percentile == 50.0 and rep.latency_ms == rep.timing.p50_ms
    assert [c.name for c in rep.checks] == ["latency"] and rep.from_metadata == {}


def test_nothing_to_check_is_bad_input(exported):
    """No budget (argument or metadata) and no accuracy target: no verdict, not a pass."""
    with pytest.raises(BadInput, match="^nothing to check: give --latency-ms and/or --min-accuracy"):
        validate(exported.path, **fast(batch=2, percentile=50.0, threads=0))
    with pytest.raises(BadInput, match="^nothing to check"):  # a dataset alone computes an accuracy, judges nothing
        validate(exported.path, dataset="quickstart", **FAST)


def test_a_report_without_checks_never_passes(exported):
    rep = validate(exported.path, latency_ms=1000.0, **FAST)
    assert rep.passed
    empty = dataclasses.replace(rep, checks=())
    assert not empty.passed and empty.summary().startswith("FAIL - nothing was checked")


def test_accuracy_equals_torch_accuracy(exported, quickstart):
    """Oracle: the accuracy the gate reports is the torch network's accuracy on the same test split."""
    rep = validate(exported.path, min_accuracy=0.0, **FAST)
    with torch.no_grad():
        torch_acc = float((exported.model(quickstart.test_x).argmax(1) == quickstart.test_y).float().mean())
    assert rep.accuracy == pytest.approx(torch_acc, abs=1 / 360)
    assert rep.passed and [c.name for c in rep.checks] == ["accuracy"]


def test_accuracy_target_fails(exported):
    rep = validate(exported.path, latency_ms=1000.0, min_accuracy=1.0, **FAST)
    assert not rep.passed
    by_name = {c.name: c for c in rep.checks}
    assert by_name["latency"].passed and not by_name["accuracy"].passed
    assert by_name["accuracy"].measured == rep.accuracy < 1.0


def test_impossible_budget_fails(exported):
    rep = validate(exported.path, latency_ms=1e-6, **FAST)
    assert not rep.passed
    (check,) = rep.checks
    assert check.measured > check.limit == 1e-6
    assert "budget" in check.message and "> budget" in check.message
    assert rep.summary().startswith("FAIL")


def test_report_json(tmp_path, exported):
    rep = validate(exported.path, latency_ms=1000.0, **fast(batch=3))
    d = json.loads(rep.write_json(tmp_path / "r.json").read_text())
    assert REPORT_KEYS <= set(d)
    assert d["provider"] == "cpu" and d["batch"] == 3 and d["input_shape"] == [3, 1, 16, 16]
    assert 0 < d["p50_ms"] <= d["p90_ms"] and d["timed_runs"] == 5
    assert d["runtime"].startswith("onnxruntime ")
    assert d["passed"] is True and d["budget_ms"] == 1000.0 and d["checks"][0]["name"] == "latency"
    assert "flexslim.arch" not in d["metadata"] and d["metadata"]["flexslim.dataset"] == "quickstart"
    assert d["dataset"] is None and d["accuracy"] is None  # latency only: the metadata's dataset is not read


def test_junit_xml(tmp_path, exported):
    failing = validate(exported.path, latency_ms=1e-6, min_accuracy=0.0, **FAST)
    root = ET.parse(failing.write_junit(tmp_path / "fail.xml")).getroot()
    suite = root.find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"latency", "accuracy"}
    fail = cases["latency"].find("failure")
    assert fail is not None and "budget" in fail.get("message")
    assert cases["accuracy"].find("failure") is None
    assert json.loads(cases["latency"].find("system-out").text)["limit"] == 1e-6

    passing = validate(exported.path, latency_ms=1000.0, **FAST)
    root = ET.parse(passing.write_junit(tmp_path / "pass.xml")).getroot()
    assert root.find("testsuite").get("failures") == "0" and not list(root.iter("failure"))


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"latency_ms": 0.0}, "--latency-ms"),
        ({"latency_ms": -1.0}, "--latency-ms"),
        ({"min_accuracy": 1.5}, "--min-accuracy"),
        ({"measure": Measurement(percentile=0.0)}, "percentile"),
        ({"measure": Measurement(batch=0)}, "batch"),
        ({"provider": "tpu"}, "tpu"),
        ({"dataset": "imagenet"}, "imagenet"),
    ],
)
def test_impossible_arguments_are_bad_input(exported, kw, needle):
    with pytest.raises(BadInput, match=needle):
        validate(exported.path, **{**FAST, **kw})


def test_bad_files_are_bad_input(tmp_path, exported, make_onnx):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported.path.read_bytes()[: exported.path.stat().st_size // 2])
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path in (truncated, text, empty, tmp_path / "missing.onnx"):
        with pytest.raises(BadInput) as e:
            validate(path, latency_ms=1.0, **FAST)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BadInput, match="inputs"):
        validate(make_onnx("two.onnx", inputs=(("a", ["N", 3, 4, 4]), ("b", ["N", 3, 4, 4]))), **FAST)
    with pytest.raises(BadInput, match="N,C,H,W"):
        validate(make_onnx("flat.onnx", inputs=(("a", ["N", 10]),)), **FAST)
    with pytest.raises(BadInput, match="dynamic"):  # a budget: else "nothing to check" comes first
        validate(make_onnx("dyn.onnx", inputs=(("a", ["N", 3, "H", "W"]),)), latency_ms=1.0, **FAST)


# ---------------------------------------------------------------- the acceptance check: any torchvision classifier


def test_torchvision_model_library(torchvision_onnx):
    rep = validate(torchvision_onnx, latency_ms=10_000.0, **FAST)
    assert rep.passed
    assert rep.timing.batch == 1 and rep.timing.input_shape == (1, 3, 32, 32)  # its fixed batch
    assert rep.dataset is None and rep.accuracy is None and rep.metadata.get("flexslim.dataset") is None
    with pytest.raises(BadInput, match="fixed batch"):
        validate(torchvision_onnx, latency_ms=10_000.0, **fast(batch=8))
    with pytest.raises(BadInput, match="--dataset"):
        validate(torchvision_onnx, min_accuracy=0.5, **FAST)


def test_torchvision_model_accuracy_on_cifar_shaped_quickstart_is_refused(torchvision_onnx):
    with pytest.raises(BadInput, match="3-channel"):  # with a target: a dataset alone is nothing to check
        validate(torchvision_onnx, min_accuracy=0.5, dataset="quickstart", **FAST)


def test_torchvision_model_cli_loose_and_impossible_budget(tmp_path, cli, torchvision_onnx):
    ok = cli.invoke(app, ["validate", str(torchvision_onnx), "--latency-ms", "10000", *FAST_ARGS])
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.stdout

    report = tmp_path / "r.json"
    bad = cli.invoke(
        app, ["validate", str(torchvision_onnx), "--latency-ms", "1e-6", "--report", str(report), *FAST_ARGS]
    )
    assert bad.exit_code == 1, bad.output
    measured = json.loads(report.read_text())["latency_ms"]
    assert "FAIL" in bad.stdout
    assert f"{measured:.4f}" in bad.stdout and "1e-06" in bad.stdout  # measured vs budget


# ---------------------------------------------------------------- CLI


def test_cli_loose_budget_exit_0_and_files(tmp_path, cli, exported):
    report, junit = tmp_path / "out" / "r.json", tmp_path / "j.xml"
    res = cli.invoke(
        app,
        [
            "validate",
            str(exported.path),
            "--latency-ms",
            "1000",
            "--report",
            str(report),
            "--junit",
            str(junit),
            *FAST_ARGS,
        ],
    )
    assert res.exit_code == 0, res.output
    d = json.loads(report.read_text())
    assert d["passed"] and REPORT_KEYS <= set(d) and d["batch"] == 4
    assert d["accuracy"] is None and d["dataset"] is None  # latency only: no dataset touched
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "0"
    assert "provider cpu" in res.stdout and "PASS" in res.stdout


def test_cli_impossible_budget_exit_1_shows_measured_vs_budget(tmp_path, cli, exported):
    report, junit = tmp_path / "r.json", tmp_path / "j.xml"
    res = cli.invoke(
        app,
        [
            "validate",
            str(exported.path),
            "--latency-ms",
            "0.000001",
            "--report",
            str(report),
            "--junit",
            str(junit),
            *FAST_ARGS,
        ],
    )
    assert res.exit_code == 1, res.output
    d = json.loads(report.read_text())
    assert d["passed"] is False
    assert f"{d['latency_ms']:.4f}" in res.stdout and "1e-06" in res.stdout and "FAIL" in res.stdout
    assert len(list(ET.parse(junit).getroot().iter("failure"))) == 1


def test_cli_bad_files_exit_2_one_line(tmp_path, cli, exported, one_line_error):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported.path.read_bytes()[:1000])
    text = tmp_path / "readme.onnx"
    text.write_text("hello, I am text\n" * 20)
    for path in (truncated, text, tmp_path / "missing.onnx"):
        res = cli.invoke(app, ["validate", str(path), "--latency-ms", "1", *FAST_ARGS])
        assert res.exit_code == 2, res.output
        line = one_line_error(res)
        assert path.name in line


def test_cli_impossible_argument_exit_2(cli, exported, one_line_error):
    res = cli.invoke(app, ["validate", str(exported.path), "--latency-ms", "-3", *FAST_ARGS])
    assert res.exit_code == 2
    assert "--latency-ms" in one_line_error(res)


def test_min_seconds_keeps_timing_past_the_minimum_runs(exported):
    rep = validate(exported.path, latency_ms=1000.0, measure=Measurement(runs=5, warmup=1, min_seconds=0.3))
    # each pass of this tiny graph takes well under a millisecond: 0.3 s of passes is far more than 5
    assert rep.timing.runs > 5
    assert rep.timing.runs * rep.timing.batch * rep.timing.p50_ms >= 0.3e3 * 0.5  # passes span >= 0.3 s


def test_with_a_tolerance_the_gate_stops_once_it_knows_and_says_so(cli, exported, tmp_path):
    """+-50% on the p90 of a tiny graph is known within the first quarter of 2 s on any machine: timing stops there,
    and the report and the console say with what confidence; without --tolerance the same gate times 2 s."""
    report = tmp_path / "r.json"
    args = ["validate", str(exported.path), "--latency-ms", "1000", "--runs", "20", "--warmup", "2"]
    res = cli.invoke(app, [*args, "--tolerance", "0.5", "--report", str(report)])
    assert res.exit_code == 0, res.output
    r = json.loads(report.read_text())
    assert r["stopped_known"] is True and r["tolerance"] == 0.5 and r["precision"] == "fp32"
    low, high = r["latency_interval_ms"]
    assert low <= r["latency_ms"] <= high and high <= 1.5 * r["latency_ms"]
    assert "timing stopped after" in res.stdout and "95% interval" in res.stdout
    rep = validate(exported.path, latency_ms=1000.0, measure=Measurement(runs=20, warmup=2, tolerance=0.5))
    assert rep.timing.known and 0.25 * 2.0 <= rep.timing.elapsed_s < 2.0  # the EARLIEST floor, then stopped
    full = validate(exported.path, latency_ms=1000.0, measure=Measurement(runs=20, warmup=2, min_seconds=0.4))
    assert not full.timing.known and full.timing.elapsed_s >= 0.4


# ---------------------------------------------------------------- the provider that ran is the provider asked for


def _with_provider(src, dst, value: str):
    import onnx

    proto = onnx.load(str(src))
    kept = [p for p in proto.metadata_props if p.key != "flexslim.latency_provider"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "flexslim.latency_provider", value
    onnx.save(proto, str(dst))
    return dst


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@no_cuda
def test_cli_cuda_asked_without_cuda_is_exit_2_naming_it(tmp_path, cli, exported, one_line_error):
    report = tmp_path / "r.json"
    res = cli.invoke(
        app, ["validate", str(exported.path), "--latency-ms", "1000", "--provider", "cuda", "--report", str(report)]
    )
    assert res.exit_code == 2
    line = one_line_error(res)
    assert "--provider cuda" in line and "cannot run here" in line
    assert not report.exists()


@no_cuda
def test_cli_cuda_asked_where_onnxruntime_runs_the_cpu_is_exit_2(tmp_path, cli, exported, one_line_error, monkeypatch):
    """onnxruntime-gpu lists CUDA on this machine but cannot load it: the session it makes runs on the CPU. Before,
    the gate timed on the CPU and kept the verdict (`provider cpu (asked: cuda)`); now that is exit 2."""
    from flexslim.latency import sessions

    monkeypatch.setattr(sessions, "cuda_usable", lambda: True)
    report = tmp_path / "r.json"
    res = cli.invoke(
        app,
        ["validate", str(exported.path), "--latency-ms", "1000", "--provider", "cuda", "--report", str(report)],
    )
    assert res.exit_code == 2, res.output
    line = one_line_error(res)
    assert "--provider cuda" in line and "on the CPU" in line
    assert not report.exists()


@no_cuda
def test_auto_with_a_cuda_model_on_a_cpu_machine_measures_cpu_and_says_so(tmp_path, cli, exported):
    model = _with_provider(exported.path, tmp_path / "cuda.onnx", "cuda")
    rep = validate(model, latency_ms=1000.0, **FAST)
    assert rep.passed and rep.timing.provider == "cpu" and rep.requested_provider == "auto"
    (note,) = [n for n in rep.notes if "flexslim.latency_provider" in n]
    assert "searched for cuda" in note and "measured on cpu" in note
    assert rep.to_dict()["notes"] == list(rep.notes)
    res = cli.invoke(app, ["validate", str(model), "--latency-ms", "1000", *FAST_ARGS])
    assert res.exit_code == 0, res.output
    assert "note: the model was searched for cuda" in res.stdout


def test_auto_takes_the_models_cpu_provider(tmp_path):
    from flexslim.deploy.gate import resolve_provider

    assert resolve_provider("auto", {"flexslim.latency_provider": "cpu"}) == ("cpu", ())
    assert resolve_provider("auto", {"flexslim.latency_provider": "auto"}) == ("auto", ())
    assert resolve_provider("auto", {}) == ("auto", ())
    assert resolve_provider("cpu", {"flexslim.latency_provider": "cuda"}) == ("cpu", ())  # the flag wins


def test_auto_with_a_cuda_model_prefers_cuda_where_it_runs(monkeypatch):
    from flexslim.deploy import gate

    monkeypatch.setattr(gate, "cuda_usable", lambda: True)
    assert gate.resolve_provider("auto", {"flexslim.latency_provider": "cuda"}) == ("auto", ())  # CUDA first


def test_unknown_provider_in_metadata_is_exit_2(tmp_path, cli, exported, one_line_error):
    model = _with_provider(exported.path, tmp_path / "tpu.onnx", "tpu")
    res = cli.invoke(app, ["validate", str(model), "--latency-ms", "1000", "--provider", "cpu", *FAST_ARGS])
    assert res.exit_code == 2
    assert "flexslim.latency_provider" in one_line_error(res)
