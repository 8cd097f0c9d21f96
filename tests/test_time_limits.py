"""Time limits of a measurement (#18.4): `--timeout` / `latency.timeout` stop a timing that runs too long (exit 1,
`timed out after S s`), the isolated helper is killed when a call outlives its limit (not left timing), and a
warm-up already over EARLY_STOP x the budget fails the gate without the timed passes. No real long waits: a slow
ONNX graph (a chain of MatMuls, ~0.1-0.5 s a pass on one thread) and a sleeping helper call."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from flexslim.cli import app
from flexslim.deploy.gate import Measurement, validate
from flexslim.errors import EXIT_GATE, BadInput, TimedOut
from flexslim.latency import runtime
from flexslim.system.exits import exit_code_for

FAST = ["--runs", "3", "--warmup", "0", "--min-seconds", "0", "--threads", "1"]


def slow_classifier(path: Path, width: int = 1024, depth: int = 24) -> Path:
    """A (N, 1, 16, 16) -> (N, 10) classifier that is slow on purpose: `depth` (width x width) MatMuls, one weight
    shared (4 MiB at 1024), about 0.1-0.5 s a pass at batch 32 on one thread."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((256, width)) / 16).astype(np.float32), "w_in"),
        numpy_helper.from_array((rng.standard_normal((width, width)) / width**0.5).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((width, 10)).astype(np.float32), "w_out"),
    ]
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w_in"], ["h0"])]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"], name=f"mm{i}"))
    nodes.append(helper.make_node("MatMul", [f"h{depth}", "w_out"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    return slow_classifier(tmp_path_factory.mktemp("slow") / "slow.onnx")


def _pass_seconds(path: Path) -> float:
    """The fastest of five passes: one pass timed while the suite's other worker ran read at least 4x its own cost,
    and a limit of a quarter of that let a pass finish inside it (a clean-clone CI run, 2026-12-08)."""
    session = runtime.make_session(path, "cpu", 1)
    x = np.zeros((32, 1, 16, 16), np.float32)
    session.run(None, {"x": x})
    seconds = []
    for _ in range(5):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        seconds.append(time.perf_counter() - t0)
    return min(seconds)


# ---------------------------------------------------------------- in-process timing


def test_a_timing_past_its_limit_stops_and_says_so(slow_model):
    per_pass = _pass_seconds(slow_model)
    limit = max(0.5, 2.5 * per_pass)
    session = runtime.make_session(slow_model, "cpu", 1)
    t0 = time.perf_counter()
    t = runtime.time_session(session, runtime.TimingPlan(32, warmup=2, runs=1000, threads=1, timeout=limit))
    took = time.perf_counter() - t0
    assert t.stopped == "timeout" and t.timeout_s == limit
    assert t.runs < 1000 and took < limit + 2 * per_pass + 1.0  # stopped at the limit, not after 1000 passes
    assert t.to_dict()["stopped"] == "timeout"


def test_a_pass_in_flight_is_cancelled_at_the_limit(slow_model):
    """A limit shorter than one pass: onnxruntime's RunOptions.terminate ends the pass (between nodes)."""
    per_pass = _pass_seconds(slow_model)
    session = runtime.make_session(slow_model, "cpu", 1)
    limit = per_pass / 4
    t0 = time.perf_counter()
    t = runtime.time_session(session, runtime.TimingPlan(32, warmup=0, runs=5, threads=1, timeout=limit))
    assert t.stopped == "timeout" and t.runs == 0 and t.warmup == 0
    assert time.perf_counter() - t0 < per_pass + 0.5  # did not finish the pass, let alone five
    assert t.at_percentile_ms >= limit * 1e3 / 32 * 0.9  # a lower bound: the pass took at least this long


def test_no_limit_hit_times_in_full(exported):
    session = runtime.make_session(exported.path, "cpu", 1)
    plan = runtime.TimingPlan(4, warmup=1, runs=5, threads=1, timeout=60.0)
    t = runtime.time_session(session, plan, budget_ms=1e4)
    assert t.stopped is None and t.runs == 5 and t.warmup == 1


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), 1e9])
def test_impossible_timeouts_are_bad_input(exported, bad):
    session = runtime.make_session(exported.path, "cpu", 1)
    with pytest.raises(BadInput, match="timeout"):
        runtime.time_session(session, runtime.TimingPlan(4, warmup=0, runs=1, timeout=bad))


# ---------------------------------------------------------------- early FAIL: warm-up far over the budget


def test_warm_up_far_over_budget_fails_without_timed_passes(exported):
    rep = validate(exported.path, latency_ms=1e-6, measure=Measurement(warmup=5, runs=50, min_seconds=10.0))
    assert not rep.passed and rep.timing.stopped == "over_budget"
    assert rep.timing.runs == 0 and rep.timing.warmup == 4  # judged on the three warm-up passes after the first
    assert rep.timing.elapsed_s < 5.0  # not the 10 s of timed passes asked for
    (check,) = rep.checks
    assert check.name == "latency" and not check.passed and check.measured > 3 * check.limit
    assert "warm-up" in check.message and "no timed passes" in check.message
    assert any("timing stopped after 4 warm-up passes" in n for n in rep.notes)
    assert rep.to_dict()["stopped"] == "over_budget"


def test_one_slow_warm_up_pass_is_not_an_early_fail():
    """The early FAIL judges the fastest of three warm-up passes after the first: a second pass 6x slow (a
    hiccup) stops nothing; three passes all over EARLY_STOP x the budget stop it after the fourth."""
    from flexslim.latency.runtime import EARLY_STOP, _warm_up

    class Passes:
        def __init__(self, ms):
            self.ms = list(ms)

        def one(self):
            return self.ms.pop(0)

    hiccup = Passes([9.0, 6.0] + [1.0] * 8)
    assert _warm_up(hiccup, 10, budget_ms=1.0) == ([9.0, 6.0] + [1.0] * 8, None)
    slow = [1.1 * EARLY_STOP] * 10
    assert _warm_up(Passes(slow), 10, budget_ms=1.0) == (slow[:4], "over_budget")
    assert _warm_up(Passes(slow[:2]), 2, budget_ms=1.0) == (slow[:2], "over_budget")  # fewer warm-ups: all judged
    assert _warm_up(Passes(slow[:1]), 1, budget_ms=1.0) == (slow[:1], "over_budget")


def test_a_budget_within_reach_is_timed_in_full(exported):
    """Only far over the budget stops early: a generous budget gets every timed pass."""
    rep = validate(exported.path, latency_ms=1e4, measure=Measurement(warmup=3, runs=7, min_seconds=0.0))
    assert rep.passed and rep.timing.stopped is None and rep.timing.runs == 7 and rep.timing.warmup == 3


def test_cli_early_fail_exit_1(tmp_path, exported):
    report = tmp_path / "r.json"
    res = CliRunner().invoke(
        app,
        [
            "validate",
            str(exported.path),
            "--latency-ms",
            "1e-6",
            "--warmup",
            "4",
            "--runs",
            "50",
            "--min-seconds",
            "10",
            "--report",
            str(report),
        ],
    )
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.stdout and "stopped after the warm-up" in res.stdout
    data = json.loads(report.read_text())
    assert data["passed"] is False and data["stopped"] == "over_budget" and data["timed_runs"] == 0


# ---------------------------------------------------------------- the gate and the CLI


def test_cli_timeout_is_exit_1_with_a_timeout_check(tmp_path, slow_model):
    report, junit = tmp_path / "r.json", tmp_path / "j.xml"
    per_pass = _pass_seconds(slow_model)
    limit = max(0.5, 1.5 * per_pass)
    t0 = time.perf_counter()
    res = CliRunner().invoke(
        app,
        [
            "validate",
            str(slow_model),
            "--latency-ms",
            "1000",
            "--runs",
            "10000",
            "--warmup",
            "1",
            "--min-seconds",
            "0",
            "--threads",
            "1",
            "--timeout",
            f"{limit:g}",
            "--min-accuracy",
            "0.0",
            "--dataset",
            "quickstart",
            "--report",
            str(report),
            "--junit",
            str(junit),
        ],
    )
    assert time.perf_counter() - t0 < limit + 2 * per_pass + 5.0
    assert res.exit_code == EXIT_GATE, res.output
    assert f"timed out after {limit:g} s" in res.stdout and "FAIL" in res.stdout
    data = json.loads(report.read_text())
    assert data["passed"] is False and data["stopped"] == "timeout" and data["timeout_s"] == limit
    assert [c["name"] for c in data["checks"]] == ["timeout"] and data["accuracy"] is None  # nothing more measured
    assert 'name="timeout"' in junit.read_text() and "<failure" in junit.read_text()


def test_cli_impossible_timeout_is_exit_2(exported, one_line_error):
    res = CliRunner().invoke(app, ["validate", str(exported.path), "--latency-ms", "1", *FAST, "--timeout", "0"])
    assert res.exit_code == 2
    assert "--timeout" in one_line_error(res)


def test_measurement_flags_carry_the_timeout():
    assert Measurement(timeout=5.0).flags() == ["--timeout", "5.0"]
    assert Measurement().timeout == runtime.DEFAULT_TIMEOUT == 600.0


# ---------------------------------------------------------------- the isolated helper


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_helper_call_past_its_limit_kills_the_helper():
    helper_pid = runtime.run_isolated(os.getpid)
    assert helper_pid != os.getpid() and _alive(helper_pid)
    t0 = time.perf_counter()
    with pytest.raises(TimedOut, match="timed out after 1 s") as err:
        runtime.run_isolated(time.sleep, 60, limit_s=1.0)
    assert time.perf_counter() - t0 < 6.0
    assert exit_code_for(err.value) == EXIT_GATE
    assert not _alive(helper_pid)  # terminated, not left sleeping (or timing) on its own
    assert helper_pid not in [p.pid for p in multiprocessing.active_children()]
    assert runtime.run_isolated(os.getpid) not in (helper_pid, os.getpid())  # the next call gets a new helper


def test_time_isolated_uses_the_limit_and_raises_timed_out(slow_model):
    """The latency model's path (`time_isolated`, recipe `latency.timeout`): the helper stops its own timing at the
    limit and that is TimedOut (exit 1), not a partial figure."""
    model = slow_model.read_bytes()
    with pytest.raises(TimedOut, match="timed out after 0.3 s"):
        runtime.time_isolated(
            model, "cpu", runtime.TimingPlan(batch=32, warmup=0, runs=10_000, percentile=90.0, threads=1, timeout=0.3)
        )


def test_recipe_latency_timeout_key():
    from flexslim.recipe.schema import load_recipe

    assert load_recipe("quickstart").latency.timeout == 600.0
    assert load_recipe("quickstart", ["latency.timeout=30"]).latency.timeout == 30.0
    for bad in ("0", "-5", "inf"):
        with pytest.raises(BadInput, match="latency.timeout"):
            load_recipe("quickstart", [f"latency.timeout={bad}"])


# ---------------------------------------------------------------- the export gate: the run's recorded latency.timeout


@pytest.fixture
def export_run_dir(tiny_run):
    """Factory: a run folder with the tiny model.pt and a run.json of budget 1000 ms and the given latency settings
    (+ a recipe.toml when given); the export reuses the session's graph instead of the slow dynamo export."""
    return tiny_run


RUN_LATENCY = {"provider": "cpu", "batch": 4, "threads": 1, "percentile": 90.0}  # run.json's, before the timeout


def test_export_gates_under_the_runs_recorded_timeout(export_run_dir):
    """A run whose latency.timeout is 0.5 s: the gate's 2 s of timed passes cannot fit, so export's gate ends with
    the failed `timeout` check (exit 1, `timed out after 0.5 s`), not the 600 s default."""
    run = export_run_dir({**RUN_LATENCY, "timeout": 0.5})
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["export", "out.onnx", "--run-dir", str(run)])
    assert time.perf_counter() - t0 < 60.0
    assert res.exit_code == EXIT_GATE, res.output
    assert "timed out after 0.5 s" in res.stdout and "FAIL" in res.stdout
    assert (run.parent / "out.onnx").is_file()  # the export itself is written; only the gate failed


def test_export_reads_an_old_run_json_without_the_timeout(export_run_dir):
    """run.json from before latency.timeout was recorded: the default (600 s), and the gate runs as before."""
    from flexslim.jobs.export import export_run

    run = export_run_dir(dict(RUN_LATENCY))
    result = export_run("old.onnx", run)
    assert result.report.passed and result.report.timing.timeout_s == runtime.DEFAULT_TIMEOUT
    assert result.report.timing.stopped is None


def test_export_starts_the_gate_helper_with_the_gates_imports_before_it_converts(export_run_dir, monkeypatch):
    """The gate's helper is started, with the gate's imports queued in it (`deploy.gate.preload`), before the
    conversion, so its start-up overlaps the export; the gate then runs in it. Without a budget there is no gate and
    no helper is started for one."""
    from flexslim.jobs import export as export_job

    order = []
    start, convert = runtime.start_isolated, export_job.export_as_deployed

    def spy_start(fn, *args):
        order.append(("start", fn.__name__, args))
        start(fn, *args)

    def spy_convert(*args, **kwargs):
        order.append(("convert",))
        return convert(*args, **kwargs)

    monkeypatch.setattr(runtime, "start_isolated", spy_start)
    monkeypatch.setattr(export_job, "export_as_deployed", spy_convert)
    run = export_run_dir(dict(RUN_LATENCY))
    assert export_job.export_run("gated.onnx", run).report.passed
    assert order == [("start", "preload", (True,)), ("convert",)]
    order.clear()
    (run / "run.json").write_text(json.dumps({"latency": RUN_LATENCY}))  # no budget: nothing to gate
    assert export_job.export_run("plain.onnx", run).report is None and order == [("convert",)]


def test_export_timeout_falls_back_to_the_runs_recipe_and_a_bad_one_is_bad_input(export_run_dir, monkeypatch):
    from flexslim.jobs import export as export_job

    seen = []
    monkeypatch.setattr(
        export_job, "gate_in_fresh_process", lambda path, budget, provider, measure, dataset, *_: seen.append(measure)
    )
    export_job.export_run("a.onnx", export_run_dir(dict(RUN_LATENCY), ["latency.timeout=30"]))
    assert seen[-1].timeout == 30.0  # an old run.json: the run's own recipe.toml
    export_job.export_run("b.onnx", export_run_dir({**RUN_LATENCY, "timeout": 7.5}))
    assert seen[-1].timeout == 7.5  # recorded: it wins
    for bad in (0, -1, "abc", 1e9):
        run = export_run_dir({**RUN_LATENCY, "timeout": bad})
        with pytest.raises(BadInput, match=r"run\.json latency\.timeout"):
            export_job.export_run("c.onnx", run)
    assert not Path("c.onnx").exists() and len(seen) == 2  # refused before the export and the gate


def test_export_gate_helper_has_a_kill_after_limit(monkeypatch):
    """As `time_isolated`: the helper running export's gate is killed past the timeout + HELPER_GRACE (+ the
    accuracy pass's allowance when the gate reads a dataset)."""
    from flexslim.jobs import export as export_job

    limits = []
    monkeypatch.setattr(runtime, "run_isolated", lambda fn, *a, limit_s=None, **kw: limits.append(limit_s))
    export_job.gate_in_fresh_process(Path("m.onnx"), 1.0, "cpu", Measurement(timeout=2.0), None)
    export_job.gate_in_fresh_process(Path("m.onnx"), 1.0, "cpu", Measurement(timeout=2.0), "quickstart")
    export_job.gate_in_fresh_process(Path("m.onnx"), 1.0, "cpu", None, None)
    grace = runtime.HELPER_GRACE
    assert limits == [2.0 + grace, 2.0 + grace + export_job.ACCURACY_SECONDS, runtime.DEFAULT_TIMEOUT + grace]
