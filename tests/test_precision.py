"""Deploying at int8 (and fp16): the graph converted as it will run (`models.precision`), the format chosen by
measurement (`latency.profiling.int8_format_for`, against a fake clock), the latency cache keeping precisions
apart, calibration on D_t only, export writing the deployed graph beside its fp32 twin, and the gate reading the
precision from the graph itself (never from what its metadata claims). Real onnxruntime quantization throughout;
fp16 needs the CUDA provider (marked gpu)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from flexslim.errors import BadInput
from flexslim.latency.runtime import Timing
from flexslim.models.precision import deployed, graph_precision, noise_images
from flexslim.recipe.choices import INT8_FORMATS
from flexslim.recipe.schema import LatencyConfig, load_recipe


def _run(graph: bytes, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def fp32_graph(exported) -> bytes:
    return exported.path.read_bytes()


@pytest.mark.parametrize("fmt", INT8_FORMATS)
def test_int8_graph_in_every_format_keeps_io_metadata_and_close_scores(fp32_graph, exported, fmt):
    q = deployed(fp32_graph, "int8", fmt, noise_images(exported.arch.input_shape, n=64))
    proto = onnx.load_model_from_string(q)
    assert graph_precision(proto) == "int8" and graph_precision(onnx.load_model_from_string(fp32_graph)) == "fp32"
    ops = {n.op_type for n in proto.graph.node}
    assert ("QLinearConv" in ops) == fmt.startswith("qoperator") and ("DequantizeLinear" in ops)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 images in
    assert {p.key: p.value for p in proto.metadata_props} == exported.metadata
    x = noise_images(exported.arch.input_shape, n=8, seed=1)
    ref, got = _run(fp32_graph, x), _run(q, x)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()  # quantized, not another function


def test_fp32_is_the_graph_itself_and_unknown_names_are_refused(fp32_graph):
    assert deployed(fp32_graph, "fp32", "auto") is fp32_graph
    with pytest.raises(ValueError, match="resolve 'auto'"):
        deployed(fp32_graph, "int8", "auto")
    with pytest.raises(ValueError, match="precision"):
        deployed(fp32_graph, "int4", "qdq-s8s8")


def _clock(ms: dict[str, float]):
    """A Measurer whose network times `ms[what it is asked to time]` (fp32 or an int8 format); records the asks."""
    asked = []

    def measurer(arch, widths, s, seed):
        what = s.int8_format if s.precision == "int8" else s.precision
        asked.append(what)
        t = Timing("cpu", s.batch, (s.batch, *arch.input_shape), 1, 1, 1, s.percentile, ms[what], ms[what],
                   ms[what], ms[what], "fake")  # fmt: skip
        return t, (ms[what],)

    measurer.asked = asked
    return measurer


def test_the_fastest_int8_format_is_chosen_by_measurement(tiny_arch):
    from flexslim.latency.profiling import int8_format_for
    from flexslim.system.console import Reporter

    s = LatencyConfig(provider="cpu", precision="int8")
    clock = _clock({"fp32": 1.0, "qoperator-u8s8": 0.7, "qdq-s8s8": 1.6, "qdq-u8s8": 0.8})
    chosen, timings = int8_format_for(tiny_arch, s, Reporter(), clock)
    assert chosen.int8_format == "qoperator-u8s8" and chosen.precision == "int8"
    assert timings == {"fp32": 1.0, "qoperator-u8s8": 0.7, "qdq-s8s8": 1.6, "qdq-u8s8": 0.8}
    assert sorted(clock.asked) == sorted(["fp32", *INT8_FORMATS])
    # a pinned format, and fp32, are taken as they are: nothing timed
    quiet = _clock({})
    assert (
        int8_format_for(tiny_arch, replace(s, int8_format="qdq-s8s8"), Reporter(), quiet)[0].int8_format == "qdq-s8s8"
    )
    assert int8_format_for(tiny_arch, LatencyConfig(provider="cpu"), Reporter(), quiet) == (
        LatencyConfig(provider="cpu"),
        {},
    )
    assert quiet.asked == []


def test_int8_slower_than_fp32_in_every_format_stops_the_job(tiny_arch):
    from flexslim.latency.profiling import int8_format_for
    from flexslim.system.console import Reporter

    clock = _clock({"fp32": 1.0, "qoperator-u8s8": 1.2, "qdq-s8s8": 1.7, "qdq-u8s8": 1.3})
    with pytest.raises(BadInput, match=r"int8 is not faster than fp32.*qdq-s8s8 1\.7000 ms.*--precision fp32"):
        int8_format_for(tiny_arch, LatencyConfig(provider="cpu", precision="int8"), Reporter(), clock)


def test_fp16_without_cuda_is_refused_before_anything_is_measured(tiny_arch):
    from flexslim.latency.profiling import check_precision_runs

    with pytest.raises(BadInput, match="fp16 runs on onnxruntime's CUDA provider only"):
        check_precision_runs(LatencyConfig(provider="cpu", precision="fp16"))
    check_precision_runs(LatencyConfig(provider="cpu", precision="int8"))  # no error


def test_fp16_search_is_exit_2_on_a_cpu_machine(cli, tmp_path):
    from flexslim.cli import app

    res = cli.invoke(app, ["search", "--latency-ms", "1", "--precision", "fp16", "--provider", "cpu",
                           "--run-dir", str(tmp_path / "run")])  # fmt: skip
    assert res.exit_code == 2 and "fp16 runs on onnxruntime's CUDA provider only" in res.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory


def test_the_latency_cache_keeps_precisions_and_formats_apart(tiny_arch):
    from flexslim.latency.fingerprint import network_key, precision_tag

    w = dict(tiny_arch.widths)
    fp32 = LatencyConfig()
    tags = [precision_tag(fp32)] + [precision_tag(LatencyConfig(precision="int8", int8_format=f)) for f in INT8_FORMATS]
    assert tags[0] == "" and len(set(tags)) == len(tags)
    keys = {network_key(tiny_arch, w, t) for t in tags}
    assert len(keys) == len(tags) and network_key(tiny_arch, w) == network_key(tiny_arch, w, "")  # fp32 as before


def test_graph_key_of_int8_graphs_ignores_weights_and_ranges_not_the_format(fp32_graph, exported, tiny_model):
    from flexslim.latency.fingerprint import graph_key

    shape = exported.arch.input_shape
    a = deployed(fp32_graph, "int8", "qdq-s8s8", noise_images(shape, seed=0))
    b = deployed(fp32_graph, "int8", "qdq-s8s8", 0.5 * noise_images(shape, seed=3))  # other ranges
    c = deployed(fp32_graph, "int8", "qoperator-u8s8", noise_images(shape, seed=0))
    assert graph_key(a) == graph_key(b) != graph_key(c) != graph_key(fp32_graph)


def test_old_tables_and_recipes_read_a_numeric_precision_as_the_stopping_tolerance(tmp_path):
    recipe = load_recipe("quickstart", ["latency.precision=0.01"])
    assert recipe.latency.tolerance == 0.01 and recipe.latency.precision == "fp32"
    with pytest.raises(BadInput, match="latency.precision"):
        load_recipe("quickstart", ["latency.precision=int4"])
    from flexslim.latency.model import _settings

    s = _settings({"provider": "cpu", "precision": 0.05, "batch": 4}, tmp_path / "t.json")
    assert s.tolerance == 0.05 and s.precision == "fp32"
    with pytest.raises(BadInput, match="settings.int8_format"):
        _settings({"precision": "int8", "int8_format": "qdq-s4"}, tmp_path / "t.json")


def test_a_table_serves_only_its_precision_and_hands_over_its_format(tiny_arch):
    from flexslim.latency.model import LatencyModel, with_grid

    table = LatencyModel(tiny_arch, LatencyConfig(provider="cpu", precision="int8", int8_format="qdq-u8s8"), "cpu",
                         "ort", "host", block=8)  # fmt: skip
    with pytest.raises(BadInput, match=r"precision int8 \(the recipe's latency.precision: fp32\)"):
        table.check_compatible(tiny_arch, LatencyConfig(provider="cpu"), "t.json")
    table.check_compatible(tiny_arch, LatencyConfig(provider="cpu", precision="int8"), "t.json")  # auto: its format
    with pytest.raises(BadInput, match="int8_format qdq-u8s8"):
        table.check_compatible(tiny_arch, LatencyConfig(provider="cpu", precision="int8", int8_format="qdq-s8s8"), "t")
    recipe = load_recipe("quickstart", ["latency.precision=int8"])
    assert with_grid(recipe, table).latency.int8_format == "qdq-u8s8"


def test_a_timed_int8_network_is_measured_as_the_quantized_graph(tiny_arch, monkeypatch):
    """profiling.measure exports, quantizes, then times: the graph the timer receives is int8 in the asked format."""
    from flexslim.latency import profiling

    seen = []

    def timed(model, settings, seed):
        seen.append(graph_precision(onnx.load_model_from_string(model)))
        return Timing("cpu", 4, (4, 1, 16, 16), 1, 1, 1, 90.0, 0.1, 0.1, 0.1, 0.1, "fake")

    monkeypatch.setattr(profiling, "_timed_sessions", timed)
    s = LatencyConfig(provider="cpu", batch=4, threads=1, precision="int8", int8_format="qdq-u8s8")
    profiling.measure(tiny_arch, dict(tiny_arch.widths), s)
    profiling.measure(tiny_arch, dict(tiny_arch.widths), replace(s, precision="fp32"))
    profiling.measure(tiny_arch, dict(tiny_arch.widths), s)  # the cache answers the int8 one: not timed again
    assert seen == ["int8", "fp32"]


def test_calibration_reads_training_images_of_d_t_only(tmp_path):
    """The export's calibration images are D_t's (the weights' half of the training split): none from D_s, none
    from the test split, `latency.calibration` of them."""
    from flexslim.data.sources import load_dataset
    from flexslim.jobs.export import _calibration

    recipe = load_recipe("quickstart", ["latency.calibration=40"])
    x = _calibration(recipe, {"calibration": 40}, tmp_path)
    ds = load_dataset(recipe.data, None)
    d_t, d_s = ds.search_halves(recipe.data.split_seed)

    from flexslim.data.tensors import as_float as _as_float

    as_float = lambda t: _as_float(t).numpy()  # noqa: E731
    t_rows = {r.tobytes() for r in as_float(d_t.train_x)}
    s_rows = {r.tobytes() for r in as_float(d_s.train_x)} - t_rows
    test_rows = {r.tobytes() for r in as_float(ds.test_x)} - t_rows
    assert x.shape == (40, *ds.input_shape) and x.dtype == np.float32
    assert all(r.tobytes() in t_rows for r in x)
    assert not any(r.tobytes() in s_rows or r.tobytes() in test_rows for r in x)


@pytest.fixture
def int8_run(tiny_run):
    """A run folder of the tiny model whose run.json says it was searched for int8 (qdq-u8s8)."""
    lat = {"provider": "cpu", "batch": 4, "threads": 1, "percentile": 90.0, "timeout": 60.0, "precision": "int8",
           "int8_format": "qdq-u8s8", "calibration": 64}  # fmt: skip
    return tiny_run(lat, ["latency.precision=int8"])


def test_export_writes_the_int8_graph_beside_its_fp32_twin_and_gates_the_int8_one(int8_run, tmp_path):
    from flexslim.deploy.gate import validate
    from flexslim.jobs.export import export_run

    res = export_run("model.onnx", int8_run)
    assert res.export.path.name == "model.fp32.onnx" and res.deployed.path.name == "model.onnx"
    proto = onnx.load("model.onnx")
    meta = {p.key: p.value for p in proto.metadata_props}
    assert graph_precision(proto) == "int8" and graph_precision(onnx.load("model.fp32.onnx")) == "fp32"
    assert meta["flexslim.precision"] == "int8" and meta["flexslim.int8_format"] == "qdq-u8s8"
    assert meta["flexslim.fp32_twin"] == "model.fp32.onnx" and meta["flexslim.calibration_images"] == "64"
    assert res.report.passed and res.report.precision == "int8"
    # accuracy of the int8 graph, with its fp32 twin's next to it
    rep = validate("model.onnx", min_accuracy=0.0, dataset="quickstart", measure=_quick())
    assert rep.precision == "int8" and rep.fp32_accuracy is not None and 0.0 <= rep.accuracy <= 1.0
    assert any("its fp32 twin model.fp32.onnx" in n for n in rep.notes)
    assert rep.to_dict()["precision"] == "int8" and rep.to_dict()["fp32_accuracy"] == rep.fp32_accuracy


def _quick():
    from flexslim.deploy.gate import Measurement

    return Measurement(batch=4, threads=1, runs=5, min_seconds=0.05, warmup=1)


def test_the_gate_reads_precision_from_the_graph_not_from_its_metadata(exported, tmp_path):
    from flexslim.deploy.gate import validate

    q = onnx.load_model_from_string(deployed(exported.path.read_bytes(), "int8", "qdq-s8s8"))
    path = tmp_path / "q.onnx"
    onnx.save(q, str(path))
    assert validate(path, latency_ms=1000.0, measure=_quick()).precision == "int8"
    assert validate(path, latency_ms=1000.0, measure=_quick(), precision="int8").passed
    with pytest.raises(BadInput, match="computes in int8, not the fp32"):
        validate(path, latency_ms=1000.0, measure=_quick(), precision="fp32")
    with pytest.raises(BadInput, match="computes in fp32, not the int8"):
        validate(exported.path, latency_ms=1000.0, measure=_quick(), precision="int8")
    lying = onnx.load(str(exported.path))  # an fp32 graph whose metadata says int8
    entry = lying.metadata_props.add()
    entry.key, entry.value = "flexslim.precision", "int8"
    onnx.save(lying, str(tmp_path / "lying.onnx"))
    with pytest.raises(BadInput, match="flexslim.precision=int8 does not describe the graph, which computes in fp32"):
        validate(tmp_path / "lying.onnx", latency_ms=1000.0, measure=_quick())


def test_validate_cli_precision_flag_and_the_old_numeric_one(cli, exported):
    from flexslim.cli import app

    base = ["validate", str(exported.path), "--latency-ms", "1000", "--batch", "4", "--threads", "1",
            "--min-seconds", "0.05", "--runs", "5"]  # fmt: skip
    res = cli.invoke(app, [*base, "--precision", "int8"])
    assert res.exit_code == 2 and "computes in fp32, not the int8" in res.stderr
    res = cli.invoke(app, [*base, "--precision", "int4"])
    assert res.exit_code == 2 and "--precision" in res.stderr
    res = cli.invoke(app, [*base, "--precision", "0.05"])  # before 2026-12: the stopping tolerance
    assert res.exit_code == 0, res.output
    assert "now --tolerance" in res.stderr


@pytest.mark.gpu
def test_fp16_graph_keeps_fp32_io_and_runs_on_cuda(fp32_graph, exported):
    half = deployed(fp32_graph, "fp16", "auto")
    proto = onnx.load_model_from_string(half)
    assert graph_precision(proto) == "fp16"
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ort.preload_dlls()
    s = ort.InferenceSession(half, providers=["CUDAExecutionProvider"])
    x = noise_images(exported.arch.input_shape, n=8, seed=1)
    ref = _run(fp32_graph, x)
    assert np.abs(s.run(None, {s.get_inputs()[0].name: x})[0] - ref).max() < 0.05 * np.abs(ref).max() + 1e-3


@pytest.mark.slow
def test_int8_search_export_validate_end_to_end(tmp_path, monkeypatch, cli):
    """The README path at --precision int8 (tiny network, format pinned: the probe's choice is tested above against
    a fake clock, and on a tiny network int8 may well be slower here): the table, the bake and the gate time the
    quantized graph; export writes it beside its fp32 twin; validate --precision int8 passes it."""
    from search_fixtures import FAST_SET, TINY_SET, sets

    from flexslim.cli import app

    monkeypatch.chdir(tmp_path)
    args = sets(*TINY_SET, *FAST_SET, "search.epochs=1", "train.epochs=1", "search.trim=false",
                "latency.int8_format=qoperator-u8s8", "latency.calibration=32")  # fmt: skip
    res = cli.invoke(app, ["search", "--latency-ms", "1.0", "--precision", "int8", *args])
    assert res.exit_code == 0, res.output
    run = (tmp_path / "runs" / "latest").resolve()
    info = json.loads((run / "run.json").read_text())
    assert info["latency"]["precision"] == "int8" and info["latency"]["int8_format"] == "qoperator-u8s8"
    table = json.loads((run / "latency.json").read_text())
    assert table["settings"]["precision"] == "int8" and table["key"]["int8_format"] == "qoperator-u8s8"
    res = cli.invoke(app, ["export", "model.onnx"])
    assert res.exit_code == 0, res.output
    assert "deployed graph" in res.stdout and "int8 qoperator-u8s8, calibrated on 32 D_t images" in res.stdout
    assert (
        graph_precision(onnx.load("model.onnx")) == "int8" and graph_precision(onnx.load("model.fp32.onnx")) == "fp32"
    )
    res = cli.invoke(
        app, ["validate", "model.onnx", "--precision", "int8", "--min-accuracy", "0", "--report", "r.json"]
    )
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["precision"] == "int8" and r["fp32_accuracy"] is not None and r["budget_ms"] == 1.0


def test_export_at_another_precision_than_searched_chooses_its_format_and_says_so(int8_run, monkeypatch):
    """An int8 run exported --precision fp32 writes the plain fp32 graph; an fp32 run exported --precision int8 gets
    the fastest format by measurement (a fake clock here) and a note that its search spent fp32 latency."""
    from flexslim.jobs.export import export_run
    from flexslim.latency import profiling

    res = export_run("plain.onnx", int8_run, precision="fp32")
    assert res.deployed is None and graph_precision(onnx.load("plain.onnx")) == "fp32"
    assert any("searched for int8 latency and is deployed at fp32" in n for n in res.report.notes)
    record = json.loads((int8_run / "run.json").read_text())
    record["latency"] = {k: v for k, v in record["latency"].items() if k not in ("precision", "int8_format")}
    (int8_run / "run.json").write_text(json.dumps(record))  # an fp32 run (as before 2026-12: no precision key)
    clock = _clock({"fp32": 1.0, "qoperator-u8s8": 1.4, "qdq-s8s8": 0.9, "qdq-u8s8": 1.1})
    monkeypatch.setattr(profiling, "measure_sessions", clock)
    res = export_run("q.onnx", int8_run, precision="int8")
    meta = {p.key: p.value for p in onnx.load("q.onnx").metadata_props}
    assert meta["flexslim.int8_format"] == "qdq-s8s8" and res.report.precision == "int8"
    assert any("searched for fp32 latency" in n for n in res.report.notes)
