"""The false-pass table (#18): inputs that once passed the gate, or could, and must not. Each case runs the CLI
through typer's CliRunner and must exit 2 with exactly one `error:` line, no traceback, and no report or JUnit
file written (an existing one untouched). Classes: outputs that are not finite (N, classes) class scores, model
metadata that would loosen the measurement, nothing to check. A stray RANK (no torchrun) must not turn the gate
into a silent no-op rank: it runs as the single process, writes its report and says so in one note."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_malformed_inputs import _with_metadata
from typer.testing import CliRunner

from flexslim.cli import app
from flexslim.system import distributed

FAST = ["--runs", "2", "--warmup", "0", "--min-seconds", "0"]
OLD_REPORT = '{"passed": true, "from": "an earlier run"}'


def classifier(path: Path, kind: str = "ok", classes: int = 10, declared: bool = True) -> Path:
    """A quickstart-shaped model (1x16x16 images, float32): flatten -> matmul -> class scores, then `kind`:
    ok (N, classes) | nc11 (N, classes, 1, 1) | n (N,) | two (two outputs) | nan | inf | int (int64 labels).
    `declared=False` declares every output as a symbolic (N, C), whatever it really is: only the scores themselves
    can tell (onnxruntime only warns about the mismatch)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((256, classes)).astype(np.float32), "w")]
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], ["s"])]
    outs = [("y", TensorProto.FLOAT, ["N", classes])]
    if kind == "ok":
        nodes.append(helper.make_node("Identity", ["s"], ["y"]))
    elif kind == "nc11":
        inits.append(numpy_helper.from_array(np.array([-1, classes, 1, 1], dtype=np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["s", "shape"], ["y"]))
        outs = [("y", TensorProto.FLOAT, ["N", classes, 1, 1])]
    elif kind == "n":
        nodes.append(helper.make_node("ReduceMax", ["s"], ["y"], axes=[1], keepdims=0))
        outs = [("y", TensorProto.FLOAT, ["N"])]
    elif kind == "two":
        nodes += [helper.make_node("Identity", ["s"], ["y"]), helper.make_node("Neg", ["s"], ["z"])]
        outs.append(("z", TensorProto.FLOAT, ["N", classes]))
    elif kind in ("nan", "inf"):
        inits.append(numpy_helper.from_array(np.array([np.nan if kind == "nan" else np.inf], np.float32), "c"))
        nodes.append(helper.make_node("Mul" if kind == "nan" else "Add", ["s", "c"], ["y"]))
    elif kind == "int":
        nodes.append(helper.make_node("ArgMax", ["s"], ["y"], axis=1, keepdims=0))
        outs = [("y", TensorProto.INT64, ["N"])]
    else:
        raise ValueError(kind)
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info(n, t, shape if declared else ["N", "C"]) for n, t, shape in outs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class World:
    """The files a case points at, made in its temporary folder (the working directory)."""

    def __init__(self, root: Path, make_onnx):
        self.root, self._make_onnx = root, make_onnx

    def model(self, kind: str = "ok", **kw) -> str:
        name = f"{kind}-{kw.get('classes', 10)}-{kw.get('declared', True)}.onnx"
        return str(classifier(self.root / name, kind, **kw))

    def plain(self, **meta: str) -> str:
        """conftest's make_onnx graph (a Relu: latency only), with `flexslim.*` metadata when given."""
        src = self._make_onnx("plain.onnx")
        return str(_with_metadata(src, self.root / "meta.onnx", **meta)) if meta else str(src)

    def named(self, kind: str = "ok", classes: int = 10, declared: bool = True, **meta: str) -> str:
        src = classifier(self.root / "src.onnx", kind, classes, declared)
        return str(_with_metadata(src, self.root / "named.onnx", **meta))


def _cuda_here() -> bool:
    from flexslim.latency.runtime import cuda_usable

    return cuda_usable()


ACC = ["--dataset", "quickstart", "--min-accuracy", "0"]  # a target every accuracy in [0, 1] meets
CASES: list[tuple[str, object, str]] = []  # (id, argv builder, text the error line must contain)


def case(name: str, needle: str):
    def add(build):
        CASES.append((name, build, needle))
        return build

    return add


# -- outputs that are not one finite (N, classes): each of these once "passed" --min-accuracy 0 (or crashed) ----
for declared in (True, False):
    d = "declared" if declared else "undeclared"
    case(f"(N,10,1,1) output, {d}", "10, 1, 1)")(lambda w, k=declared: [w.model("nc11", declared=k), *ACC])
    case(f"(N,) output, {d}", ",);")(lambda w, k=declared: [w.model("n", declared=k), *ACC])
    case(f"two outputs, {d}", "outputs")(lambda w, k=declared: [w.model("two", declared=k), *ACC])
    case(f"7 classes for a 10-class dataset, {d}", ", 7)")(
        lambda w, k=declared: [w.model("ok", classes=7, declared=k), *ACC]
    )
    case(f"NaN scores, {d}", "NaN")(lambda w, k=declared: [w.model("nan", declared=k), *ACC])
    case(f"inf scores, {d}", "inf")(lambda w, k=declared: [w.model("inf", declared=k), *ACC])
case("int64 labels instead of scores", ",);")(lambda w: [w.model("int"), *ACC])
case("(N,10,1,1) output with a budget too", "(N, 10, 1, 1)")(lambda w: [w.model("nc11"), "--latency-ms", "1e4", *ACC])
case("class_names metadata of 3, 10 scores", "(N, 3)")(lambda w: [w.named(class_names='["a", "b", "c"]'), *ACC])
case("class_names metadata of 3, a 10-class dataset", "flexslim.class_names")(
    lambda w: [w.named("ok", 3, False, class_names='["a", "b", "c"]'), *ACC]
)
case("class_names metadata not a list", "flexslim.class_names")(lambda w: [w.named(class_names="{oops"), *ACC])

# -- metadata that would loosen the measurement: refused, naming the key and the flag that allows it -----------
for key, value, flag in [
    ("latency_percentile", "0.1", "--percentile 0.1"),
    ("latency_percentile", "50", "--percentile 50"),
    ("latency_percentile", "89.9", "--percentile 89.9"),
    ("latency_batch", "33", "--batch 33"),
    ("latency_batch", "4096", "--batch 4096"),
    ("latency_threads", "1024", "--threads 1024"),
]:
    needle = f"model metadata flexslim.{key}={value} would loosen the gate: pass {flag} to allow it"
    case(f"metadata {key}={value} with --latency-ms", needle)(
        lambda w, k=key, v=value: [w.plain(**{k: v}), "--latency-ms", "1e4"]
    )
    case(f"metadata {key}={value} with the budget in metadata", needle)(
        lambda w, k=key, v=value: [w.plain(budget_ms="1e4", **{k: v})]
    )
case("metadata batch that is not the model's fixed batch", "fixed batch of 2")(
    lambda w: [
        str(
            _with_metadata(
                w._make_onnx("fixed.onnx", inputs=(("x", [2, 3, 8, 8]),)), w.root / "f.onnx", latency_batch="1"
            )
        ),
        "--latency-ms",
        "1e4",
    ]
)

# -- nothing to check: no budget from flags or metadata, no accuracy target --------------------------------------
NOTHING = "nothing to check: give --latency-ms and/or --min-accuracy"
case("no flags", NOTHING)(lambda w: [w.plain()])
case("only --percentile", NOTHING)(lambda w: [w.plain(), "--percentile", "99"])
case("only a dataset in metadata", NOTHING)(lambda w: [w.named(dataset="quickstart")])
case("only --dataset", NOTHING)(lambda w: [w.model(), "--dataset", "quickstart"])
case("only --data", NOTHING)(lambda w: [w.model(), "--data", "."])
case("--min-accuracy without a dataset", "--dataset")(lambda w: [w.model(), "--min-accuracy", "0"])

# -- the provider that ran must be the one asked for; a time limit must be a real one (#18.3, #18.4) ----------------
if not _cuda_here():  # asked for cuda where it cannot run: once timed on the CPU and judged
    case("--provider cuda without a usable CUDA", "--provider cuda")(
        lambda w: [w.plain(), "--latency-ms", "1e4", "--provider", "cuda"]
    )
case("metadata latency_provider=tpu", "flexslim.latency_provider")(
    lambda w: [w.plain(latency_provider="tpu"), "--latency-ms", "1e4"]
)
for bad in ("0", "-1", "inf", "nan", "1e9"):
    case(f"--timeout {bad}", "--timeout")(lambda w, b=bad: [w.plain(), "--latency-ms", "1e4", "--timeout", b])


def test_the_table_is_large_enough():
    assert len(CASES) >= 25, len(CASES)
    assert len({c[0] for c in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.parametrize("name, build, needle", CASES, ids=[c[0] for c in CASES])
def test_false_pass_exits_2_with_one_line(tmp_path, monkeypatch, make_onnx, name, build, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEXSLIM_LOG_DIR", str(tmp_path / "logs"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "old.json").write_text(OLD_REPORT)
    argv = ["validate", *build(World(tmp_path, make_onnx)), *FAST, "--report", "r.json", "--junit", "j.xml"]
    argv += ["--report", "old.json"]  # the last --report wins: an existing report must stay as it was
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, f"{argv}: exit {res.exit_code}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    text = res.stderr.strip()
    assert "Traceback" not in res.output
    assert len(text.splitlines()) == 1, f"expected one line on stderr, got:\n{text}"
    assert text.startswith("error:") and needle in text, text
    assert not (tmp_path / "j.xml").exists() and not (tmp_path / "r.json").exists()
    assert (tmp_path / "old.json").read_text() == OLD_REPORT
    assert "PASS" not in res.stdout
    assert not (tmp_path / "logs").exists(), "a bad input is not a crash"


# -- a stray RANK is not a rank -------------------------------------------------------------------------------------
STRAY = [
    {"RANK": "1"},
    {"RANK": "1", "WORLD_SIZE": "2"},
    {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"},  # no MASTER_ADDR, no TORCHELASTIC_RUN_ID
    {"WORLD_SIZE": "2"},
]


@pytest.mark.parametrize("env", STRAY, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e in STRAY])
def test_a_stray_rank_still_gates_and_writes_its_report(tmp_path, monkeypatch, make_onnx, env):
    monkeypatch.chdir(tmp_path)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    argv = ["validate", str(make_onnx()), "--latency-ms", "1e4", "--report", "r.json", "--junit", "j.xml", *FAST]
    res = CliRunner().invoke(app, argv, env=env)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True and (tmp_path / "j.xml").is_file()
    assert "PASS" in res.stdout
    (note,) = res.stderr.strip().splitlines()
    assert note.startswith("note: ignoring") and "single process" in note and "error" not in note
    bad = CliRunner().invoke(app, ["validate", str(make_onnx()), "--latency-ms", "1e-9", *FAST], env=env)
    assert bad.exit_code == 1  # and a slow model still fails there


def test_a_stray_rank_search_is_not_a_silent_rank(tmp_path, monkeypatch):
    """search with a stray RANK reports its bad input as the single process does (rank 1 of a world of 1 used to
    print nothing it shared, write nothing, and could exit 0)."""
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["search", "--latency-ms", "1", "--set", "train.nosuch=1"], env={"RANK": "1"})
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("note: ignoring RANK=1") and lines[1].startswith("error:") and len(lines) == 2


@pytest.mark.parametrize(
    "env, rank, world",
    [
        ({}, 0, 1),
        ({"RANK": "1"}, 0, 1),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 0, 1),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}, 1, 2),  # torchrun's env://
        ({"RANK": "2", "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "job"}, 2, 4),  # torchrun's own marker
    ],
)
def test_only_torchrun_makes_a_rank(monkeypatch, env, rank, world):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.rank() == rank and distributed.launched_world() == world
    assert distributed.is_main() == (rank == 0)
    assert (distributed.stray_rank_note() is not None) == (bool(env) and not distributed.launched_by_torchrun())


# -- what still passes, and how it says so --------------------------------------------------------------------------
def test_a_good_classifier_passes_and_flags_allow_what_metadata_may_not(tmp_path, monkeypatch, make_onnx):
    monkeypatch.chdir(tmp_path)
    good = classifier(tmp_path / "good.onnx")
    res = CliRunner().invoke(app, ["validate", str(good), *ACC, *FAST, "--report", "r.json"])
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "r.json").read_text())
    assert 0.0 <= d["accuracy"] <= 1.0 and d["num_test"] == 360 and [c["name"] for c in d["checks"]] == ["accuracy"]

    loose = _with_metadata(make_onnx(), tmp_path / "loose.onnx", latency_percentile="50", latency_batch="64")
    res = CliRunner().invoke(
        app,
        [
            "validate",
            str(loose),
            "--latency-ms",
            "1e4",
            "--percentile",
            "50",
            "--batch",
            "64",
            *FAST,
            "--report",
            "l.json",
        ],
    )
    assert res.exit_code == 0, res.output  # the flags ask for it: allowed, and the report shows the flags' values
    d = json.loads((tmp_path / "l.json").read_text())
    assert d["percentile"] == 50.0 and d["batch"] == 64 and d["from_metadata"] == {}


def test_the_verdict_line_names_every_metadata_value_as_plain_text(tmp_path, monkeypatch, make_onnx):
    monkeypatch.chdir(tmp_path)
    model = _with_metadata(
        make_onnx(),
        tmp_path / "m.onnx",
        budget_ms="1e4",
        latency_percentile="95",
        latency_batch="3",
        latency_threads="1",
    )
    res = CliRunner().invoke(app, ["validate", str(model), *FAST])
    assert res.exit_code == 0, res.output
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("PASS")]
    assert "budget 10000 ms from the model's metadata" in line
    assert line.endswith(
        "[from the model's metadata: flexslim.budget_ms=10000.0, flexslim.latency_percentile=95.0, "
        "flexslim.latency_threads=1, flexslim.latency_batch=3]"
    ), line


def test_a_latency_only_gate_touches_no_dataset(tmp_path, monkeypatch):
    """The model's metadata names a dataset: a latency check must not load (or download) it."""
    import flexslim.data.sources as sources

    def forbidden(*args, **kwargs):
        raise AssertionError("a latency-only gate loaded a dataset")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "load_dataset", forbidden)
    model = _with_metadata(classifier(tmp_path / "c.onnx"), tmp_path / "cifar.onnx", dataset="cifar10")
    res = CliRunner().invoke(app, ["validate", str(model), "--latency-ms", "1e4", *FAST, "--report", "r.json"])
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["dataset"] is None and d["accuracy"] is None and "dataset" not in d["from_metadata"]


def test_an_accuracy_outside_0_1_is_an_internal_error_not_a_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEXSLIM_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(importlib.import_module("flexslim.deploy.gate"), "_accuracy", lambda *a, **k: (20.5, 360))
    res = CliRunner().invoke(app, ["validate", str(classifier(tmp_path / "c.onnx")), *ACC, *FAST, "--report", "r.json"])
    assert res.exit_code == 3, res.output
    assert "accuracy of 20.5" in res.stderr and not (tmp_path / "r.json").exists()
