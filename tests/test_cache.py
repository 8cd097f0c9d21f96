"""The latency cache (flexslim.latency.cache): the key (device fingerprint x graph), thoroughness, concurrent writers,
corrupt and torn files, the size bound, `flexslim cache list|clear`, `--no-cache`, and the commands that read it
(profile twice: the second times nothing; run.json counts what the cache served).

Every test has its own $FLEXSLIM_CACHE (conftest.py). Timings here are fakes: a Timing made up from the settings, or
runtime.time_isolated replaced by a function of the ONNX model's size (the networks are still exported).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from search_fixtures import FAST_LATENCY, FAST_SET, TINY_SET, sets

from flexslim.cli import app
from flexslim.latency import cache, runtime
from flexslim.latency import fingerprint as latency_fingerprint
from flexslim.latency.cache import LatencyCache, Thoroughness
from flexslim.latency.runtime import Timing

FP = {"provider": "cpu", "batch": 8, "threads": 1, "percentile": 90.0, "test": "fingerprint"}
THOROUGH = Thoroughness(1.0, 1, 10)


def _timing(settings=FAST_LATENCY, ms: float = 0.5, threads: int | None = None) -> Timing:
    s = settings
    provider = "cuda" if s.provider == "cuda" else "cpu"
    sessions = tuple(ms * (1 + 0.01 * i) for i in range(max(1, s.repeats)))
    return Timing(
        provider, s.batch, (s.batch, 1, 8, 8), s.threads if threads is None else threads, s.warmup, s.runs,
        s.percentile, ms, ms, ms, ms, "onnxruntime test", sessions=sessions, elapsed_s=0.25,
    )  # fmt: skip


def _onnx(width: int = 4, seed: int = 0) -> bytes:
    """A one-conv ONNX graph (1 -> `width` channels) with random weights drawn by `seed`."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(seed).random((width, 1, 3, 3), dtype=np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width, 8, 8])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


class _Clock:
    """measure() callables for `cache.timing_of` that count the timings they make (each a new number)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, settings):
        def measure() -> Timing:
            self.calls += 1
            return _timing(settings, 0.5 + self.calls)

        return measure


# -- the key --------------------------------------------------------------------------------------------------------
def test_the_same_graph_on_the_same_device_hits_any_change_of_the_key_misses(monkeypatch):
    from flexslim.latency import model as latency_model

    clock, s, net = _Clock(), FAST_LATENCY, _onnx()
    first = cache.timing_of(net, s, clock(s))
    assert cache.timing_of(net, s, clock(s)) == first and clock.calls == 1  # served, equal to what was measured
    assert cache.timing_of(_onnx(seed=7), s, clock(s)) == first  # other weights, the same graph
    assert cache.tally().hits >= 2
    for changed in (
        dataclasses.replace(s, threads=2),
        dataclasses.replace(s, batch=4),
        dataclasses.replace(s, percentile=50.0),
    ):
        assert cache.timing_of(net, changed, clock(changed)) != first
    assert clock.calls == 4
    cache.timing_of(_onnx(width=8), s, clock(s))  # another graph
    assert clock.calls == 5

    host = cache._host()
    monkeypatch.setattr(latency_fingerprint, "_host", lambda: {**host, "onnxruntime": "0.0.1"})  # another onnxruntime
    assert cache.timing_of(net, s, clock(s)) != first and clock.calls == 6
    monkeypatch.setattr(latency_fingerprint, "_host", lambda: {**host, "cpu": "Another CPU"})  # another CPU
    assert cache.timing_of(net, s, clock(s)) != first and clock.calls == 7
    monkeypatch.setattr(latency_fingerprint, "_host", lambda: host)
    assert cache.timing_of(net, s, clock(s)) == first and clock.calls == 7  # back on this device: served again

    monkeypatch.setattr(latency_model, "provider_that_runs", lambda p: "cuda" if p == "cuda" else "cpu")
    monkeypatch.setattr(latency_fingerprint, "_gpu", lambda: {"gpu": "Fake GPU", "capability": "9.0", "driver": "1.0"})
    on_cuda = dataclasses.replace(s, provider="cuda")
    assert cache.timing_of(net, on_cuda, clock(on_cuda)).provider == "cuda" and clock.calls == 8


def test_the_fingerprint_names_the_device_and_the_settings():
    fp = cache.fingerprint(FAST_LATENCY)
    assert fp["provider"] == "cpu" and fp["threads"] == 1 and fp["batch"] == 8 and fp["percentile"] == 90.0
    assert fp["statistic"] == cache.STATISTIC_VERSION and fp["onnxruntime"] and fp["cpu"] and fp["cores"] >= 1
    assert cache.fingerprint_id(fp) == cache.fingerprint_id(dict(reversed(fp.items())))  # order does not matter
    assert len(cache.fingerprint_id(fp)) == 16


def test_the_graph_key_leaves_out_weight_values_only():
    from search_fixtures import small_arch

    from flexslim.models.families import build_network
    from flexslim.models.onnx_graph import onnx_bytes

    arch = small_arch()
    nets = []
    for seed, widths in ((0, arch.widths), (1, arch.widths), (0, {**arch.widths, "c": 16})):
        import torch

        torch.manual_seed(seed)
        nets.append(onnx_bytes(build_network(arch, widths).eval(), arch.input_shape, fast=True))
    assert nets[0] != nets[1]  # other weights ...
    assert cache.graph_key(nets[0]) == cache.graph_key(nets[1])  # ... the same graph
    assert cache.graph_key(nets[0]) != cache.graph_key(nets[2])  # another width


# -- thoroughness ---------------------------------------------------------------------------------------------------
def test_a_shorter_measurement_never_serves_a_longer_request():
    clock, net = _Clock(), _onnx()
    quick = dataclasses.replace(FAST_LATENCY, min_seconds=0.2, repeats=1)
    gate = dataclasses.replace(FAST_LATENCY, min_seconds=6.0, repeats=3)
    short = cache.timing_of(net, quick, clock(quick))
    long = cache.timing_of(net, gate, clock(gate))
    assert clock.calls == 2 and long != short  # the quick entry did not answer the gate-length request
    assert cache.timing_of(net, gate, clock(gate)) == long
    assert cache.timing_of(net, quick, clock(quick)) == short  # the same kind of measurement first (reproducible)
    middle = dataclasses.replace(FAST_LATENCY, min_seconds=1.0, repeats=1)
    assert cache.timing_of(net, middle, clock(middle)) == long  # none of its kind: the longer one serves the shorter
    assert clock.calls == 2
    more_runs = dataclasses.replace(gate, runs=gate.runs * 2)
    cache.timing_of(net, more_runs, clock(more_runs))
    assert clock.calls == 3
    with cache.refreshing():  # a deliberate second timing is a timing
        again = cache.timing_of(net, gate, clock(gate))
    assert clock.calls == 4 and cache.timing_of(net, gate, clock(gate)) == again  # and it is kept


def test_a_timing_that_stopped_or_of_another_setting_is_not_kept(tmp_path):
    store = LatencyCache(tmp_path, FP)
    assert not store.put("k", dataclasses.replace(_timing(), stopped="timeout"), THOROUGH)
    assert not store.put("k", _timing(threads=4), THOROUGH)  # threads 4 is not this fingerprint's
    assert store.get("k", THOROUGH) is None and not store.path.exists()


# -- concurrency, corruption, the bound ---------------------------------------------------------------------------
WRITER = """
import sys, time
from pathlib import Path
from flexslim.latency.cache import LatencyCache, Thoroughness
from flexslim.latency.runtime import Timing

folder, tag, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
store = LatencyCache(folder, {"provider": "cpu", "batch": 8, "threads": 1, "percentile": 90.0, "test": "fingerprint"})
(go.parent / f"ready-{tag}").touch()
while not go.exists():
    time.sleep(0.001)
for i in range(50):
    ms = 1.0 + i
    t = Timing("cpu", 8, (8, 1, 8, 8), 1, 2, 10, 90.0, ms, ms, ms, ms, "test", sessions=(ms,))
    assert store.put(f"{tag}-{i}", t, Thoroughness(1.0, 1, 10))
"""


def test_two_processes_adding_at_once_lose_nothing(tmp_path):
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "c"), tag, str(go)], stderr=subprocess.PIPE)
        for tag in ("a", "b")
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{tag}").exists() for tag in "ab") and time.monotonic() < deadline:
        time.sleep(0.01)  # both imported: they start together
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    store = LatencyCache(tmp_path / "c", FP)
    keys = {e.key for e in store.entries()}
    assert keys == {f"{tag}-{i}" for tag in "ab" for i in range(50)}
    assert len(store.path.read_bytes().splitlines()) == 100  # whole lines, nothing interleaved
    assert store.get("b-49", THOROUGH).at_percentile_ms == 50.0


def test_a_corrupt_or_torn_file_is_ignored_with_one_note(tmp_path, capsys):
    store = LatencyCache(tmp_path, FP)
    t = _timing()
    assert store.put("good", t, THOROUGH)
    good = store.path.read_bytes().strip()
    tampered = json.loads(good)
    tampered["timing"]["at_percentile_ms"] = 0.001  # its checksum no longer fits
    forged = json.loads(good)
    forged["key"], forged["timing"]["at_percentile_ms"] = "nan", float("nan")
    forged["sum"] = cache._checksum({k: v for k, v in forged.items() if k != "sum"})  # a valid sum, a NaN latency
    other = json.loads(good)
    other["key"], other["fp"] = "other", "0123456789abcdef"  # a line of another fingerprint's file
    other["sum"] = cache._checksum({k: v for k, v in other.items() if k != "sum"})
    lines = [good, b"{not json", b"\x00\xff\xfe binary", json.dumps(tampered).encode(), json.dumps(forged).encode()]
    lines.append(json.dumps(other).encode())
    store.path.write_bytes(b"\n".join(lines) + b'\n{"v": 1, "key": "torn')  # killed mid-line
    fresh = LatencyCache(tmp_path, FP)
    assert fresh.get("good", THOROUGH) == t
    assert fresh.get("nan", THOROUGH) is None and fresh.get("other", THOROUGH) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: latency cache") and "5 corrupt entries ignored" in err[0], err
    t2 = _timing(ms=0.75)
    assert fresh.put("after", t2, THOROUGH)  # after the torn line: a line of its own
    assert [e.key for e in LatencyCache(tmp_path, FP).entries()] == ["good", "after"]
    assert capsys.readouterr().err == ""  # one note per file

    garbage = LatencyCache(tmp_path / "g", FP)
    garbage.folder.mkdir()
    garbage.path.write_bytes(bytes(range(256)) * 40)
    assert garbage.get("good", THOROUGH) is None  # no crash, no point


def test_a_corrupt_cache_file_makes_a_measurement_not_a_crash(capsys):
    clock, net = _Clock(), _onnx()
    first = cache.timing_of(net, FAST_LATENCY, clock(FAST_LATENCY))
    store = cache.store_for(FAST_LATENCY)
    store.path.write_bytes(b"\x00garbage\n" * 3)
    again = cache.timing_of(net, FAST_LATENCY, clock(FAST_LATENCY))
    assert clock.calls == 2 and again != first
    assert "3 corrupt entries ignored" in capsys.readouterr().err


def test_an_unwritable_cache_folder_is_a_note_not_a_failure(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    store = LatencyCache(tmp_path / "file" / "latency", FP)
    assert not store.put("k", _timing(), THOROUGH)
    assert "cannot be written" in capsys.readouterr().err


def test_the_cache_keeps_the_newest_entries_within_its_caps(tmp_path):
    store = LatencyCache(tmp_path / "n", FP, max_entries=10)
    for i in range(25):
        assert store.put(f"k{i}", _timing(ms=1.0 + i), THOROUGH)
    keys = [e.key for e in LatencyCache(tmp_path / "n", FP).entries()]
    assert 1 <= len(keys) <= 10 and keys[-1] == "k24" and "k0" not in keys
    assert keys == sorted(keys, key=lambda k: int(k[1:]))  # oldest dropped first
    by_size = LatencyCache(tmp_path / "s", FP, max_bytes=6000)
    for i in range(25):
        by_size.put(f"k{i}", _timing(ms=1.0 + i), THOROUGH)
    assert by_size.path.stat().st_size <= 6000 and by_size.get("k24", THOROUGH) is not None


# -- the commands ---------------------------------------------------------------------------------------------------
def test_cache_list_and_clear(cli, flexslim_cache):
    folder = flexslim_cache / "latency"
    a = LatencyCache(folder, FP)
    for i in range(3):
        a.put(f"k{i}", _timing(ms=1.0 + i), THOROUGH)
    b = LatencyCache(folder, {**FP, "threads": 2})
    b.put("k", _timing(threads=2), THOROUGH)
    (flexslim_cache / "cifar10").mkdir()  # a download: not the latency cache's
    (folder / "notes.txt").write_text("mine")

    from flexslim.latency import rechecks

    for fresh in (1.01, 1.02, 1.05):  # a's re-timings: the bake's headroom floor there
        rechecks.record(a.id, 1.0, fresh, "bake")
    res = cli.invoke(app, ["cache", "list"])
    assert res.exit_code == 0, res.output
    row = {s.id: next((ln for ln in res.stdout.splitlines() if s.id in ln), "") for s in (a, b)}
    assert "threads 1" in row[a.id] and re.search(r"│\s*3\s*│", row[a.id]), res.stdout
    assert "threads 2" in row[b.id] and re.search(r"│\s*1\s*│", row[b.id]), res.stdout
    assert "5.0% (3 re-timings)" in row[a.id] and "3.0% (prior)" in row[b.id], res.stdout

    res = cli.invoke(app, ["cache", "clear"])
    assert res.exit_code == 0, res.output
    # .jsonl, .json, .lock of each, and a's re-timings
    assert res.stdout.count("removed ") == 7 and "7 files removed" in res.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"] and (flexslim_cache / "cifar10").is_dir()
    res = cli.invoke(app, ["cache", "list"])
    assert res.exit_code == 0 and "empty" in res.stdout


def _fake_timer(monkeypatch) -> list[int]:
    """runtime.time_isolated replaced by a function of the model's size (as tests/fake_timing_cli.py); the sizes of
    the models it timed."""
    from flexslim.latency.model import provider_that_runs

    calls: list[int] = []

    def fake(model, provider, plan):
        calls.append(len(model))
        ms = 1e-6 * len(model)
        p = plan
        return Timing(provider_that_runs(provider), p.batch, (p.batch,), p.threads, p.warmup, p.runs, p.percentile,
                      ms, ms, ms, ms, "fake")  # fmt: skip

    monkeypatch.setattr(runtime, "time_isolated", fake)
    return calls


QUICK = sets(*TINY_SET, *FAST_SET, "latency.samples=3", "latency.holdout=1")


def test_profile_twice_times_nothing_the_second_time_and_no_cache_times_it_all(cli, tmp_path, monkeypatch):
    calls = _fake_timer(monkeypatch)
    args = ["profile", "--out", str(tmp_path / "t.json"), *QUICK]
    first = cli.invoke(app, args)
    assert first.exit_code == 0, first.output
    n = len(calls)
    assert n == 4 and "(0 from the latency cache)" in first.stdout
    table = json.loads((tmp_path / "t.json").read_text())

    second = cli.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert len(calls) == n and f"({n} from the latency cache)" in second.stdout  # nothing timed
    again = json.loads((tmp_path / "t.json").read_text())
    assert again["fit_points"] == table["fit_points"] and again["holdout_points"] == table["holdout_points"]

    (cached,) = (cache.latency_folder()).glob("*.jsonl")
    before = cached.read_bytes()
    off = cli.invoke(app, [*args, "--no-cache"])
    assert off.exit_code == 0, off.output
    assert len(calls) == 2 * n and "(0 from the latency cache)" in off.stdout  # everything timed ...
    assert cached.read_bytes() == before and cache.NO_CACHE_ENV not in os.environ  # ... nothing added, flag undone


def test_no_cache_env_neither_reads_nor_writes(monkeypatch):
    clock, net = _Clock(), _onnx()
    monkeypatch.setenv(cache.NO_CACHE_ENV, "1")
    cache.timing_of(net, FAST_LATENCY, clock(FAST_LATENCY))
    cache.timing_of(net, FAST_LATENCY, clock(FAST_LATENCY))
    assert clock.calls == 2 and not cache.latency_folder().exists()


def test_run_json_counts_the_networks_the_cache_served(tmp_path, monkeypatch, tiny_arch):
    from flexslim.jobs.latency import latency_stage
    from flexslim.recipe.schema import load_recipe
    from flexslim.system.console import Reporter
    from flexslim.system.runs import RunRecord

    calls = _fake_timer(monkeypatch)
    recipe = load_recipe("quickstart", [o for o in QUICK if o != "--set"] + ["latency.provider=cpu"])
    info = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        record = RunRecord(tmp_path / name)
        latency_stage(tiny_arch, recipe, record, None, 0.08, Reporter())
        info.append(json.loads(record.path.read_text()))
    assert info[0]["latency_cache_hits"] == 0 and info[0]["latency_cache_misses"] == len(calls) > 0
    assert info[1]["latency_cache_hits"] == len(calls) and info[1]["latency_cache_misses"] == 0


def test_the_measuring_commands_take_no_cache(cli):
    for command in ("search", "profile", "sweep", "bench"):
        res = cli.invoke(app, [command, "--help"])
        assert res.exit_code == 0 and "--no-cache" in res.stdout, (command, res.output)


def test_cache_without_a_subcommand_is_one_line_exit_2(cli, one_line_error):
    res = cli.invoke(app, ["cache"])
    assert res.exit_code == 2 and "Missing command" in one_line_error(res)


def test_each_test_has_a_cache_folder_of_its_own(flexslim_cache):
    assert os.environ["FLEXSLIM_CACHE"] == str(flexslim_cache) and not any(flexslim_cache.iterdir())
    assert cache.latency_folder() == flexslim_cache / "latency"


def test_the_bake_times_an_outlier_again_instead_of_reading_it_back():
    """The bake re-times a network measured far over its prediction: that second timing must skip the cache (which
    would hand back the first); the lower of the two is kept."""
    from search_fixtures import hand_latency_model, small_arch

    from flexslim.search.desk import OUTLIER, Desk
    from flexslim.system.console import Reporter

    arch = small_arch()
    model = hand_latency_model(arch, FAST_LATENCY)
    pred = float(model.predict(arch.widths))
    reading: list[bool] = []

    def measure(a, widths, settings):
        reading.append(cache._READING.get())
        return _timing(settings, (2 * OUTLIER if len(reading) == 1 else 1.1) * pred)

    t = Desk(arch, FAST_LATENCY, model, measure, Reporter())(arch.widths, "choose")
    assert reading == [True, False] and t.at_percentile_ms == 1.1 * pred


# -- the look-up without an export ---------------------------------------------------------------------------------
def test_a_network_measured_once_is_found_again_without_exporting(monkeypatch, tiny_arch):
    from flexslim.latency import profiling
    from flexslim.models import onnx_graph

    calls = _fake_timer(monkeypatch)
    widths = dict(tiny_arch.widths)
    first, _ = profiling.measure_sessions(tiny_arch, widths, FAST_LATENCY)
    assert len(calls) == 1

    def no_export(*a, **k):
        raise AssertionError("exported although the cache knows this network")

    monkeypatch.setattr(onnx_graph, "onnx_bytes", no_export)
    before = cache.tally()
    again, _ = profiling.measure_sessions(tiny_arch, widths, FAST_LATENCY, seed=7)  # other weights, same network
    assert again == first and len(calls) == 1 and (cache.tally() - before).hits == 1
    other = {**widths, next(iter(widths)): widths[next(iter(widths))] + 8}
    with pytest.raises(AssertionError, match="exported"):
        profiling.measure_sessions(tiny_arch, other, FAST_LATENCY)  # another width: a miss, so it must export


def test_other_model_code_exports_again_and_the_graph_key_still_finds_an_unchanged_graph(monkeypatch, tiny_arch):
    from flexslim.latency import profiling

    calls = _fake_timer(monkeypatch)
    widths = dict(tiny_arch.widths)
    first, _ = profiling.measure_sessions(tiny_arch, widths, FAST_LATENCY)
    net = latency_fingerprint.network_key(tiny_arch, widths)
    monkeypatch.setattr(latency_fingerprint, "_code_id", lambda family: "edited family code")
    assert latency_fingerprint.network_key(tiny_arch, widths) != net  # the network key names the code
    again, _ = profiling.measure_sessions(tiny_arch, widths, FAST_LATENCY)
    assert again == first and len(calls) == 1  # exported, same graph: served by the graph key, not timed


def test_an_entry_with_a_malformed_network_key_is_ignored(tmp_path):
    store = LatencyCache(tmp_path, FP)
    assert store.put("k", _timing(), THOROUGH, net="n1")
    line = json.loads(store.path.read_text())
    body = {k: v for k, v in line.items() if k != "sum"} | {"net": 5}
    store.path.write_text(json.dumps({**body, "sum": cache._checksum(body)}) + "\n")
    fresh = LatencyCache(tmp_path, FP, note=lambda s: None)
    assert fresh.entries() == [] and fresh.get("n1", THOROUGH, by="net") is None


def test_a_coarser_stopping_precision_never_serves_a_finer_request():
    clock, net = _Clock(), _onnx()
    coarse = dataclasses.replace(FAST_LATENCY, tolerance=0.05)
    fine = dataclasses.replace(FAST_LATENCY, tolerance=0.01)
    full = dataclasses.replace(FAST_LATENCY, tolerance=0.0)
    a = cache.timing_of(net, coarse, clock(coarse))
    b = cache.timing_of(net, fine, clock(fine))
    assert clock.calls == 2 and a != b  # +-5% did not answer +-1%
    assert cache.timing_of(net, coarse, clock(coarse)) == a  # its own kind first
    middle = dataclasses.replace(FAST_LATENCY, tolerance=0.02)
    assert cache.timing_of(net, middle, clock(middle)) == b  # none of its kind: +-1% answers +-2%
    c = cache.timing_of(net, full, clock(full))
    assert clock.calls == 3  # a session that could stop early never answers one that must time in full ...
    finer = dataclasses.replace(FAST_LATENCY, tolerance=0.005)
    assert cache.timing_of(net, finer, clock(finer)) == c and clock.calls == 3  # ... the other way round it does


def test_the_probe_reads_only_earlier_probes_of_its_networks(monkeypatch, tiny_arch):
    """A fuller timing of a probe network (another run's fit point, another moment) must not answer the probe: the
    curve would mix two kinds of measurement. An earlier probe's entry (same thoroughness) still answers."""
    from flexslim.latency import profiling
    from flexslim.system.console import Reporter

    calls = _fake_timer(monkeypatch)
    settings = dataclasses.replace(FAST_LATENCY, min_seconds=0.9, runs=10)
    full = {s: 8 for s in tiny_arch.widths}
    profiling.measure_sessions(tiny_arch, full, settings)  # every stage at 8: also the probe's first network
    assert len(calls) == 1

    def probe():
        return profiling.probe_block(tiny_arch, settings, 8, profiling.measure_sessions, Reporter(), step=8)

    _, first = probe()
    n = len(calls)
    assert n == 1 + len(first)  # the fuller entry of the 8-channel network did not answer the probe
    before = cache.tally()
    _, again = probe()
    assert len(calls) == n and again == first and (cache.tally() - before).hits == len(first)  # earlier probes did
    hit, _ = profiling.measure_sessions(tiny_arch, full, settings)
    assert len(calls) == n and hit.sessions  # ... and it still answers the fit's own request
