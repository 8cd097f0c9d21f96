"""The remote timer (`flexslim timer serve`, `--timer URL`): a real server in its own process on loopback, real
onnxruntime timings through it, and the jobs that measure through it.

A server started with its own `--label` stands in for another device: its fingerprint differs from this machine's,
so what it measures never mixes with what is measured here (the latency cache keeps one file per fingerprint)."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from search_fixtures import FAST_SET, TINY_SET, sets

from flexslim.cli import app
from flexslim.errors import BadInput, TimedOut
from flexslim.latency import remote, wire
from flexslim.latency.runtime import Timing, TimingPlan
from flexslim.recipe.schema import LatencyConfig
from flexslim.system.console import Reporter

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
START_TIMEOUT = 60.0


def _env(**extra) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


class Server:
    """`python -m flexslim.timer serve` in its own process, logging to a file; `url` once it listens."""

    def __init__(self, folder: Path, *flags: str, label: str = "remote-a", port: int = 0, env: dict | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.token_file = folder / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.log = folder / f"server-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "flexslim.timer", "serve", "--port", str(port), "--label", label]
        cmd += [*(["--token-file", str(self.token_file)] if "--insecure-no-token" not in flags else []), *flags]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stderr=log, stdout=subprocess.DEVNULL, env=env or _env())
        deadline = time.monotonic() + START_TIMEOUT
        while not (m := re.search(r"listening on (https?://\S+)", self.text())):
            assert self.proc.poll() is None, f"the server exited {self.proc.returncode}: {self.text()}"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = m.group(1)

    def text(self) -> str:
        return self.log.read_text()

    def requests(self, method: str = "POST", path: str = "/time") -> list[str]:
        return [ln for ln in self.text().splitlines() if f" {method} {path} " in ln]

    def measured(self) -> list[tuple[float, float]]:
        return [(float(a), float(b)) for a, b in re.findall(r"measure=([\d.]+)\.\.([\d.]+)", self.text())]

    def timer(self, token: str | None = TOKEN) -> remote.Timer:
        return remote.Timer(self.url, token)

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(30)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "srv")
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _fresh_devices(monkeypatch):
    monkeypatch.setattr(remote, "_DEVICES", {})  # each test asks its own server


def _raw(url: str, method: str, path: str, headers: dict, body: bytes | None = None, send_body: bool = True):
    """(status, JSON answer) of one hand-made request; `send_body=False` sends the headers only."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest(method, path)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    if body and send_body:
        conn.send(body)
    resp = conn.getresponse()
    answer = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, answer


def _plan(**kw) -> TimingPlan:
    return TimingPlan(**{"batch": 4, "warmup": 2, "runs": 10, "threads": 1, "min_seconds": 0.2, **kw})


def _request_header(**kw) -> str:
    return json.dumps(wire.request_dict("cpu", _plan(**kw)))


# -- the wire format ----------------------------------------------------------------------------------------------
def test_a_request_round_trips_and_every_bad_value_is_named():
    provider, plan, budget = wire.request_from_dict(wire.request_dict("cpu", _plan(timeout=5.0), 0.3))
    assert (provider, plan, budget) == ("cpu", _plan(timeout=5.0), 0.3)
    _, capped, _ = wire.request_from_dict(wire.request_dict("cpu", _plan(timeout=500.0)), max_timeout=20.0)
    assert capped.timeout == 20.0  # the server's own limit wins
    for key, value in (("batch", 0), ("percentile", 101), ("threads", -1), ("runs", "ten"), ("provider", "tpu"),
                       ("min_seconds", float("nan")), ("timeout", -1), ("budget_ms", 0)):  # fmt: skip
        d = wire.request_dict("cpu", _plan())
        d[key] = value
        with pytest.raises(BadInput, match=f"timer request {key}"):
            wire.request_from_dict(d)
    with pytest.raises(BadInput, match="unknown keys path"):
        wire.request_from_dict({**wire.request_dict("cpu", _plan()), "path": "/etc/passwd"})
    with pytest.raises(BadInput, match="protocol"):
        wire.request_from_dict({**wire.request_dict("cpu", _plan()), "protocol": 99})


def test_a_timing_round_trips_and_a_corrupt_one_is_refused():
    t = Timing("cpu", 4, (4, 1, 8, 8), 1, 2, 10, 90.0, 0.01, 0.012, 0.012, 0.011, "onnxruntime x", stopped="timeout")
    assert wire.timing_from_dict(json.loads(json.dumps(t.to_dict()))) == t
    for key, value in (("p90_ms", -1.0), ("batch", True), ("stopped", "maybe"), ("at_percentile_ms", "fast")):
        with pytest.raises((ValueError, TypeError)):
            wire.timing_from_dict({**t.to_dict(), key: value})


def test_timer_urls_are_checked(monkeypatch):
    assert remote.check_url("http://10.0.0.7:8765/") == "http://10.0.0.7:8765"
    for bad in ("10.0.0.7:8765", "ftp://h:1", "http://h:1/path", "http://h:port", "http://user@h:1"):
        with pytest.raises(BadInput, match="--timer"):
            remote.check_url(bad)
    monkeypatch.setenv(remote.ENV_URL, "http://127.0.0.1:9")
    monkeypatch.setenv(remote.ENV_TOKEN_FILE, "/nonexistent/token")
    with pytest.raises(BadInput, match="token file /nonexistent/token cannot be read"):
        remote.configured()


# -- the server: safe by construction -----------------------------------------------------------------------------
def test_health_needs_no_token_and_info_needs_the_right_one(server):
    assert _raw(server.url, "GET", "/health", {}) == (200, {"ok": True})
    status, answer = _raw(server.url, "GET", "/info", {})
    assert status == 401 and "token" in answer["error"]
    status, _ = _raw(server.url, "GET", "/info", {"Authorization": "Bearer wrong-token-0123456789"})
    assert status == 401
    info = remote.device(server.timer(), LatencyConfig(provider="cpu", batch=4, threads=1))
    assert info["fingerprint"]["label"] == "remote-a" and info["fingerprint"]["threads"] == 1
    assert (
        info["fingerprint_id"]
        != remote.device(server.timer(), LatencyConfig(provider="cpu", batch=8))["fingerprint_id"]
    )  # the settings are part of it
    assert len(server.requests("GET", "/info")) == 4  # one log line per request


def test_a_wrong_or_missing_token_is_401_before_the_body_is_read_and_nothing_is_measured(server, exported):
    headers = {"Content-Length": str(50 * 2**20), "X-Flexslim-Request": _request_header()}
    for auth in ({}, {"Authorization": "Bearer not-the-token-at-all"}, {"Authorization": TOKEN}):
        t0 = time.monotonic()
        status, answer = _raw(server.url, "POST", "/time", {**headers, **auth}, b"x", send_body=False)
        assert status == 401 and time.monotonic() - t0 < 10  # answered without waiting for 50 MiB
    assert len(server.requests()) == 3 and not server.measured()
    with pytest.raises(
        remote.TimerError, match=r"timer http://127\.0\.0\.1:\d+: GET /info answered 401 .*--timer-token-file"
    ):
        remote.time_model(server.timer("wrong-token-0123456789"), exported.path.read_bytes(), "cpu", _plan())


def test_garbage_oversized_and_badly_asked_requests_are_refused(tmp_path, exported):
    s = Server(tmp_path / "small", "--max-model-mb", "0.001")  # 1 KiB
    try:
        auth = {"Authorization": f"Bearer {TOKEN}", "X-Flexslim-Request": _request_header()}
        big = b"\x08" + b"0" * 4096
        status, answer = _raw(s.url, "POST", "/time", {**auth, "Content-Length": str(len(big))}, big, send_body=False)
        assert status == 413 and "cap" in answer["error"]
        pickle = b"\x80\x04\x95" + b"\x00" * 20
        status, answer = _raw(s.url, "POST", "/time", {**auth, "Content-Length": str(len(pickle))}, pickle)
        assert status == 400 and "not an ONNX model" in answer["error"]
        junk = b"\x08\x07garbage that onnxruntime cannot parse"
        status, answer = _raw(s.url, "POST", "/time", {**auth, "Content-Length": str(len(junk))}, junk)
        assert status == 400 and "onnxruntime cannot load the model" in answer["error"]
        bad = {**auth, "X-Flexslim-Request": _request_header(batch=0), "Content-Length": "1"}
        status, answer = _raw(s.url, "POST", "/time", bad, b"\x08")
        assert status == 400 and "timer request batch" in answer["error"]
        status, answer = _raw(
            s.url, "POST", "/time", {"Authorization": auth["Authorization"], "Content-Length": "1"}, b"\x08"
        )
        assert status == 400 and "X-Flexslim-Request" in answer["error"]
        status, _ = _raw(s.url, "POST", "/nowhere", {**auth, "Content-Length": "1"}, b"\x08")
        assert status == 404
        with pytest.raises(remote.TimerError, match="over the server's cap"):
            remote.time_model(s.timer(), exported.path.read_bytes(), "cpu", _plan())
        assert _raw(s.url, "GET", "/health", {}) == (200, {"ok": True})  # still serving
    finally:
        s.stop()


def _hanging_model() -> bytes:
    """A graph whose Loop runs 2**62 times: onnxruntime never finishes a pass on its own."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", i64, []), helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", f, [])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", f, [])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )  # fmt: skip
    consts = {"M": np.array(2**62, np.int64), "cond": np.array(True), "v0": np.array(0.0, np.float32),
              "ax": np.array([1], np.int64), "reps": np.array([1, 10], np.int64)}  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "cond", "v0"], ["v"], body=body),
         helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=0),
         helper.make_node("Mul", ["m", "v"], ["s"]), helper.make_node("Unsqueeze", ["s", "ax"], ["s2"]),
         helper.make_node("Tile", ["s2", "reps"], ["y"])],
        "hang",
        [helper.make_tensor_value_info("x", f, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", f, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_model_that_hangs_fails_at_its_limit_and_the_server_keeps_serving(server, exported):
    t0 = time.monotonic()
    with pytest.raises(TimedOut, match="timed out after 2 s .* on the timer"):
        remote.time_model_bytes(server.timer(), _hanging_model(), "cpu", _plan(timeout=2.0))
    assert time.monotonic() - t0 < 2.0 + 20  # its limit, plus a fresh helper
    t = remote.time_model(server.timer(), exported.path.read_bytes(), "cpu", _plan())
    assert t.stopped is None and t.at_percentile_ms > 0
    assert "stopped=timeout" in server.requests()[0] and "stopped=None" in server.requests()[1]


def test_two_clients_at_once_never_overlap_on_the_device_and_a_full_queue_is_503(tmp_path, exported):
    s = Server(tmp_path / "q", "--max-queue", "2")
    try:
        model, results, errors = exported.path.read_bytes(), [], []

        def client(seconds: float):
            try:
                results.append(remote.time_model(s.timer(), model, "cpu", _plan(min_seconds=seconds)))
            except remote.TimerError as err:
                errors.append(str(err))

        threads = [threading.Thread(target=client, args=(1.0,)) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join(60)
        assert len(results) >= 2 and len(results) + len(errors) == 4
        assert all("answered 503" in e and "busy" in e for e in errors) and len(errors) >= 1  # queue of 2, 4 asked
        spans = sorted(s.measured())
        assert len(spans) == len(results)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans  # never overlapped
    finally:
        s.stop()


def test_remote_and_local_timings_of_the_same_network_agree(server, exported):
    from flexslim.latency.runtime import time_isolated

    model, plan = exported.path.read_bytes(), _plan(min_seconds=0.5, batch=8)
    local = [time_isolated(model, "cpu", plan).p50_ms for _ in range(2)]
    there = [remote.time_model(server.timer(), model, "cpu", plan).p50_ms for _ in range(2)]
    # the same CPU: only timing noise between them. Half-second sessions on this VM read one network anywhere from
    # 0.058 to 0.083 ms (1.43 x, measured 2026-12-02), so a 1.4 x bound failed twice on noise alone; a remote that
    # did not time this model (a constant, another network, the wrong batch) is off by more than 2 x
    ratio = min(there) / min(local)
    assert 0.5 < ratio < 2.0, (local, there)


def test_the_server_refuses_unsafe_or_impossible_settings(tmp_path, capsys):
    from flexslim.timer.__main__ import main

    (tmp_path / "short").write_text("abc\n")
    (tmp_path / "ok").write_text(TOKEN)
    for flags, message in (
        (["--host", "0.0.0.0", "--insecure-no-token"], "only allowed on loopback"),
        (["--insecure-no-token", "--token-file", str(tmp_path / "ok")], "exclude each other"),
        ([], "pass --token-file"),
        (["--token-file", str(tmp_path / "missing")], "cannot be read"),
        (["--token-file", str(tmp_path / "short")], "at least 16 characters"),
        (["--tls-cert", str(tmp_path / "c.pem"), "--insecure-no-token"], "go together"),
        (["--token-file", str(tmp_path / "ok"), "--max-queue", "0"], "must be positive"),
    ):
        assert main(["serve", "--port", "0", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (flags, err)


def test_the_server_runs_without_torch_onnx_or_typer(tmp_path, exported):
    """The server's process (and its timing helper) with torch, onnx, typer and rich made unimportable."""
    blocker = tmp_path / "block" / "sitecustomize.py"
    blocker.parent.mkdir()
    blocker.write_text(
        "import importlib.abc, sys\n"
        "class _Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'onnx', 'onnxscript', 'typer', 'rich', 'sklearn'):\n"
        "            raise ImportError('blocked for this test: ' + name)\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env = _env(PYTHONPATH=os.pathsep.join((str(blocker.parent), str(REPO))))
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "blocked for this test" in check.stderr  # the blocker works
    s = Server(tmp_path / "nt", env=env)
    try:
        t = remote.time_model(s.timer(), exported.path.read_bytes(), "cpu", _plan())
        assert t.stopped is None and t.at_percentile_ms > 0
    finally:
        s.stop()
    assert "Traceback" not in s.text()


# -- jobs that measure through it ---------------------------------------------------------------------------------
QUICK = sets(*TINY_SET, *FAST_SET, "latency.samples=4", "latency.holdout=1", "search.epochs=2", "train.epochs=1")


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexslim", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout)  # fmt: skip


def test_a_search_and_its_gate_measure_everything_on_the_timer_and_resume_after_the_server_dies(
    cli, tmp_path, flexslim_cache, exported
):
    s = Server(tmp_path / "srv", label="device-b")
    run = tmp_path / "run"
    # the bake measures its first choice only (search.trim=false): the measured bake has its own tests
    args = ["search", "--latency-ms", "0.07", "--run-dir", str(run), "--timer", s.url,
            "--timer-token-file", str(s.token_file), *QUICK, "--set", "search.trim=false"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "flexslim", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(s.requests()) < 3:  # mid-profile
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    s.stop(kill=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    (line,) = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:]
    assert s.url in line and ("connection" in line or "refused" in line) and "Traceback" not in stderr

    port = urllib.parse.urlsplit(s.url).port
    s2 = Server(tmp_path / "srv", label="device-b", port=port)  # restarted: the same device
    resumed = _cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((run / "run.json").read_text())
    assert record["measuring_device"]["measured_on"] == s.url and "device-b" in record["measuring_device"]["device"]
    assert record["latency_device"]["id"] == record["measuring_device"]["id"] and record["measured_on_device"]
    table = json.loads((run / "latency.json").read_text())
    assert {p["device"] for p in table["fit_points"] + table["holdout_points"]} == {record["measuring_device"]["id"]}

    # the export's gate (`flexslim export` runs it in the isolated helper, started before the job named its timer)
    from flexslim.deploy.gate import Measurement
    from flexslim.jobs.export import gate_in_fresh_process

    before = len(s2.requests())
    with remote.using(s2.url, s2.token_file):
        measure = dataclasses.replace(Measurement.of_run(record["latency"]), min_seconds=0.3)  # the run's settings
        report = gate_in_fresh_process(exported.path, 1.0, "cpu", measure)
    assert report.measured_on == s2.url and report.device == record["measuring_device"]["id"]
    assert len(s2.requests()) == before + 1 and report.passed
    # every measurement went to the device: this machine's fingerprint has no cache file, the device's has them all
    files = list((flexslim_cache / "latency").glob("*.jsonl"))
    assert [f.stem for f in files] == [record["measuring_device"]["id"]]
    s2.stop()

    moved = cli.invoke(app, ["search", "--latency-ms", "0.07", "--run-dir", str(run), "--resume", *QUICK])  # here
    assert moved.exit_code == 2 and "it measures on device" in moved.stderr and f"--timer {s.url}" in moved.stderr


class _Lines(Reporter):
    def __init__(self):
        self.lines: list[str] = []

    def log(self, line: str) -> None:
        self.lines.append(line)


def test_a_table_from_another_device_is_never_extended_here_and_the_bake_ranks_by_it_alone(
    cli, tmp_path, flexslim_cache
):
    from flexslim.deploy.report import Report
    from flexslim.jobs.export import _with_device_note
    from flexslim.jobs.latency import latency_stage
    from flexslim.jobs.search import _bake
    from flexslim.latency.model import LatencyModel, with_grid
    from flexslim.recipe.schema import load_recipe
    from flexslim.system.runs import RunRecord

    table = tmp_path / "lat.json"
    made = cli.invoke(app, ["profile", "--out", str(table), *QUICK])
    assert made.exit_code == 0, made.output
    lat = json.loads(table.read_text())
    here = lat["device"]
    assert here["measured_on"] == "local" and {p["device"] for p in lat["fit_points"]} == {here["id"]}
    there = {"id": "0123456789abcdef", "measured_on": "http://10.0.0.9:8765", "device": "cpu Cortex-A78 (device-c)"}
    table.write_text(json.dumps({**lat, "device": there}))  # as if profiled there with --timer
    cached = flexslim_cache / "latency"
    before = {f.name: f.read_bytes() for f in cached.glob("*.jsonl")}

    # a budget a table of this device would be refined at (near=3 > the points it holds near it)
    recipe = load_recipe("quickstart", [*QUICK[1::2], "latency.near=3"])
    arch = LatencyModel.load(table).arch
    record, reporter = RunRecord(tmp_path / "run"), _Lines()
    record.run_dir.mkdir()
    model, budget = latency_stage(arch, recipe, record, table, 0.2, reporter)
    assert [p.widths for p in model.fit_points] == [p["widths"] for p in lat["fit_points"]]  # not extended
    (line,) = [ln for ln in reporter.lines if "the latency table was measured on device 0123456789abcdef" in ln]
    assert "NOT measured on its device" in line and "--timer" in line
    assert record["measured_on_device"] is False and record["latency_device"] == there
    assert record["measuring_device"]["id"] == here["id"]

    grid = with_grid(recipe, model)  # as the search job resolves round_to before its bake
    fitted = _bake(arch, {s: float(w) for s, w in arch.widths.items()}, budget, model, grid, reporter, None)
    assert fitted.steps and all(st["measured_ms"] == pytest.approx(st["predicted_ms"]) for st in fitted.steps)
    assert {f.name: f.read_bytes() for f in cached.glob("*.jsonl")} == before  # nothing was timed here

    t = Timing("cpu", 4, (4, 1, 8, 8), 1, 2, 10, 90.0, 0.01, 0.012, 0.012, 0.011, "onnxruntime x")
    report = Report("m.onnx", "cpu", t, 0.2, None, None, 0, None, (), device=here["id"])
    notes = _with_device_note(report, RunRecord.load(record.run_dir)).notes
    assert any("not the deployment device's" in n for n in notes) and any("not measured there" in n for n in notes)


def test_a_timer_that_cannot_be_reached_is_one_line_and_exit_2(cli, tmp_path, exported):
    for args in (
        ["validate", str(exported.path), "--latency-ms", "1", "--timer", "http://127.0.0.1:9"],
        ["profile", "--out", str(tmp_path / "t.json"), "--timer", "http://127.0.0.1:9", *QUICK],
        ["validate", str(exported.path), "--latency-ms", "1", "--timer", "not-a-url"],
    ):
        res = cli.invoke(app, args)
        assert res.exit_code == 2, res.output
        (line,) = res.stderr.strip().splitlines()
        assert "--timer" in line or "timer http://127.0.0.1:9: connection refused" in line
    assert remote.ENV_URL not in os.environ  # the flag is undone after the command
