import numpy as np
import pytest
import torch

from flexslim.errors import BadInput
from flexslim.latency.runtime import (
    QUIET,
    Timing,
    TimingPlan,
    cuda_usable,
    make_session,
    provider_list,
    ran_provider,
    time_session,
    undisturbed,
)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_provider_list_cpu():
    assert provider_list("cpu") == ["CPUExecutionProvider"]


@no_cuda
def test_auto_is_cpu_only_without_cuda():
    assert cuda_usable() is False
    assert provider_list("auto") == ["CPUExecutionProvider"]


@no_cuda
def test_cuda_without_cuda_is_bad_input():
    with pytest.raises(BadInput, match="--provider cpu"):
        provider_list("cuda")


def test_unknown_provider():
    with pytest.raises(BadInput, match="auto, cpu, cuda"):
        provider_list("tensorrt")


def test_session_on_cpu(exported):
    sess = make_session(exported.path, "cpu", threads=1)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert ran_provider(sess) == "cpu"
    assert sess.get_session_options().intra_op_num_threads == 1
    # from bytes too (the latency model times networks it never writes to disk)
    assert ran_provider(make_session(exported.path.read_bytes(), "cpu")) == "cpu"


@no_cuda
def test_auto_session_runs_on_cpu(exported):
    assert ran_provider(make_session(exported.path, "auto")) == "cpu"


def test_time_session(exported):
    sess = make_session(exported.path, "cpu", threads=1)
    t = time_session(sess, TimingPlan(batch=3, warmup=1, runs=7, percentile=75.0, threads=1))
    assert isinstance(t, Timing)
    assert t.provider == "cpu" and t.batch == 3 and t.input_shape == (3, 1, 16, 16)
    assert (t.runs, t.warmup, t.threads, t.percentile) == (7, 1, 1, 75.0)
    assert 0 < t.p50_ms <= t.at_percentile_ms <= t.p90_ms
    assert t.mean_ms > 0
    assert t.runtime.startswith("onnxruntime ")
    d = t.to_dict()
    assert d["input_shape"] == [3, 1, 16, 16] and d["p90_ms"] == t.p90_ms and d["provider"] == "cpu"


def test_undisturbed_keeps_every_pass_of_a_quiet_run():
    rng = np.random.default_rng(0)
    samples = 1.0 + 0.002 * rng.standard_normal(400)  # 0.2% jitter: no window is disturbed
    kept, windows, quiet = undisturbed(samples)
    assert (windows, quiet) == (20, 20)
    assert np.array_equal(np.sort(kept), np.sort(samples))


def test_undisturbed_drops_the_windows_of_a_slow_stretch():
    """Oracle: 400 passes of 1.0 ms with a stretch of 100 passes at 1.3 ms (something else ran): the p90 over
    the undisturbed windows is the network's own 1.0 ms; over every pass it would be the disturbance's 1.3."""
    samples = np.full(400, 1.0)
    samples[200:300] = 1.3
    samples[::7] = 1.01  # the network's own tail stays in
    kept, windows, quiet = undisturbed(samples)
    assert (windows, quiet) == (20, 15)
    assert np.percentile(samples, 90) == pytest.approx(1.3)
    assert np.percentile(kept, 90) == pytest.approx(1.01)
    assert kept.max() <= QUIET * 1.0 + 1e-9


def test_undisturbed_keeps_at_least_the_quietest_quarter():
    """A jittery run (window medians 1.00, 1.05, 1.10, ...): never fewer than a quarter of the windows."""
    samples = np.repeat(1.0 + 0.05 * np.arange(20), 10)
    kept, windows, quiet = undisturbed(samples)
    assert (windows, quiet) == (20, 5)
    assert sorted(set(kept.round(6))) == [1.0, 1.05, 1.1, 1.15, 1.2]


def test_undisturbed_keeps_short_runs_whole():
    kept, windows, quiet = undisturbed([1.0, 2.0, 3.0, 9.0] * 4)  # 16 passes < 2 windows of 10
    assert (windows, quiet, len(kept)) == (1, 1, 16)


def test_time_session_reports_windows(exported):
    sess = make_session(exported.path, "cpu", threads=1)
    t = time_session(sess, TimingPlan(batch=2, warmup=1, runs=60, threads=1))
    assert t.windows == 6 and 1 <= t.quiet_windows <= 6
    assert t.all_passes_ms is not None and t.all_passes_ms > 0
    assert t.to_dict()["quiet_windows"] == t.quiet_windows


def test_time_session_is_per_sample(exported):
    """Per-sample latency: a batch of 64 costs less per image than 64 times a batch of one (and not more)."""
    sess = make_session(exported.path, "cpu", threads=1)
    one = time_session(sess, TimingPlan(batch=1, warmup=2, runs=15))
    many = time_session(sess, TimingPlan(batch=64, warmup=2, runs=15))
    assert many.p50_ms < one.p50_ms * 4  # a whole-batch time would be ~64x larger than the per-image one


def test_percentile_50_is_p50(exported):
    sess = make_session(exported.path, "cpu")
    t = time_session(sess, TimingPlan(batch=2, warmup=0, runs=5, percentile=50.0))
    assert t.at_percentile_ms == t.p50_ms


@pytest.mark.parametrize(
    "kw",
    [
        {"batch": 0},
        {"batch": 2, "runs": 0},
        {"batch": 2, "warmup": -1},
        {"batch": 2, "percentile": 0.0},
        {"batch": 2, "percentile": 101.0},
    ],
)
def test_time_session_rejects_impossible_arguments(exported, kw):
    sess = make_session(exported.path, "cpu")
    with pytest.raises(BadInput):
        time_session(sess, TimingPlan(**kw))


def test_dynamic_spatial_dims_are_bad_input(make_onnx):
    path = make_onnx(inputs=(("img", ["N", 3, "H", "W"]),))
    sess = make_session(path, "cpu")
    with pytest.raises(BadInput, match="img"):
        time_session(sess, TimingPlan(batch=2, warmup=0, runs=1))


def test_fixed_graph_times_with_its_shape(make_onnx):
    sess = make_session(make_onnx(inputs=(("x", ["N", 2, 5, 7]),)), "cpu")
    t = time_session(sess, TimingPlan(batch=4, warmup=0, runs=3))
    assert t.input_shape == (4, 2, 5, 7)
    out = sess.run(None, {"x": -np.ones((1, 2, 5, 7), np.float32)})[0]
    assert np.all(out == 0)  # the graph really is the Relu it claims to be


@pytest.mark.gpu
def test_cuda_provider_runs_on_cuda(exported):
    assert provider_list("auto")[0] == "CUDAExecutionProvider"
    sess = make_session(exported.path, "cuda")
    assert ran_provider(sess) == "cuda"
    t = time_session(sess, TimingPlan(batch=8, warmup=2, runs=5))
    assert t.provider == "cuda" and t.p50_ms <= t.p90_ms


@pytest.mark.parametrize(
    "kw, needle", [({"batch": 5000}, "4096"), ({"runs": 10**6}, "100000"), ({"threads": -1}, "threads")]
)
def test_time_session_applies_the_caps(exported, kw, needle):
    session = make_session(exported.path, "cpu", 1)
    args = {"batch": 2, "warmup": 0, "runs": 1, **kw}
    with pytest.raises(BadInput, match=needle):
        time_session(session, TimingPlan(**args))


def test_a_dead_timing_process_is_an_error_not_a_silent_rerun():
    """The helper dying (here: it exits mid-call) raises TimingFailed (exit 3); the next call gets a new helper."""
    import os

    from flexslim.errors import EXIT_INTERNAL, TimingFailed
    from flexslim.latency.runtime import run_isolated
    from flexslim.system.exits import exit_code_for

    with pytest.raises(TimingFailed) as err:
        run_isolated(os._exit, 1)
    assert "timing process died" in str(err.value) and exit_code_for(err.value) == EXIT_INTERNAL
    assert run_isolated(os.getpid) != os.getpid()  # a fresh helper, still not this process


# ------------------------------------------------ the provider that ran is the provider asked for (#18.3)


class _Node:
    def __init__(self, op_type: str, name: str = ""):
        self.op_type, self.name, self.domain = op_type, name, ""


class _Subgraph:
    def __init__(self, ep: str, *nodes: _Node):
        self.ep_name, self._nodes = ep, list(nodes)

    def get_nodes(self):
        return self._nodes


class FakeSession:
    """What onnxruntime reports about a session: its providers and (optionally) each node's provider."""

    def __init__(self, providers, assigned=None):
        self._providers, self._assigned = list(providers), assigned

    def get_providers(self):
        return list(self._providers)

    def get_provider_graph_assignment_info(self):
        if self._assigned is None:
            raise RuntimeError("session.record_ep_graph_assignment_info must be set")
        return self._assigned


CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def _graph_with_shape_arithmetic():
    """x -> Conv 'conv' -> Reshape 'reshape' (shape: Shape 'shape' -> Gather 'gather' -> Concat 'concat') -> y."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Shape", ["c"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather"),
        helper.make_node("Concat", ["n", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["c", "target"], ["y"], name="reshape"),
    ]
    inits = [
        helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], [0.0] * 6),
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("minus_one", TensorProto.INT64, [1], [-1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None])
    return helper.make_graph(nodes, "g", [x], [y], initializer=inits)


def test_placement_of_a_cpu_session_is_cpu():
    from flexslim.latency.runtime import placement, require_cuda

    p = placement(FakeSession([CPU]))
    assert p.provider == "cpu"
    with pytest.raises(BadInput, match="ran the model on the CPU"):
        require_cuda(p)


def test_placement_finds_compute_nodes_left_on_the_cpu():
    from flexslim.latency.runtime import placement, require_cuda

    assigned = [
        _Subgraph(CUDA, _Node("Conv", "conv")),
        _Subgraph(CPU, _Node("Shape", "shape")),
        _Subgraph(CPU, _Node("Gather", "gather"), _Node("Concat", "concat")),
        _Subgraph(CPU, _Node("Reshape", "reshape")),  # reads the Conv's values: compute on the CPU
    ]
    p = placement(FakeSession([CUDA, CPU], assigned), _graph_with_shape_arithmetic())
    assert p.provider == "cuda" and p.cpu_nodes == ("Reshape 'reshape'",)  # shape arithmetic is allowed
    with pytest.raises(BadInput, match=r"placed 1 compute node\(s\) of m.onnx on the CPU \(Reshape 'reshape'\)"):
        require_cuda(p, "m.onnx")
    # without the graph, or for a node onnxruntime made, every CPU node but Shape/Size counts
    p = placement(FakeSession([CUDA, CPU], assigned))
    assert p.cpu_nodes == ("Gather 'gather'", "Concat 'concat'", "Reshape 'reshape'")


def test_placement_all_on_cuda_passes():
    from flexslim.latency.runtime import placement, require_cuda

    assigned = [_Subgraph(CUDA, _Node("Conv", "conv"), _Node("Reshape", "reshape")), _Subgraph(CPU, _Node("Shape"))]
    p = placement(FakeSession([CUDA, CPU], assigned), _graph_with_shape_arithmetic())
    assert p.provider == "cuda" and p.cpu_nodes == () and p.known
    require_cuda(p)


def test_placement_unknown_is_refused_for_cuda():
    """An onnxruntime that cannot report node placement: `cuda` cannot be verified, so it is not a pass."""
    from flexslim.latency.runtime import placement, require_cuda

    p = placement(FakeSession([CUDA, CPU], assigned=None))
    assert p.provider == "cuda" and not p.known
    with pytest.raises(BadInput, match="cannot report which provider runs each node"):
        require_cuda(p)


def test_real_cpu_session_records_node_placement(exported):
    """The method works on this onnxruntime: the CPU session reports every node on the CPU."""
    from flexslim.latency.runtime import placement

    sess = make_session(exported.path, "cpu", 1)
    assigned = sess.get_provider_graph_assignment_info()
    assert assigned and {s.ep_name for s in assigned} == {CPU}
    assert placement(sess).provider == "cpu"


@no_cuda
def test_cuda_asked_where_its_library_does_not_load_is_bad_input_naming_the_cpu(exported, monkeypatch):
    """onnxruntime lists CUDA here, but its library cannot load: the session it makes runs on the CPU. Asked for
    cuda, that is BadInput naming the CPU (before: timed on the CPU, reported `cpu (asked: cuda)`, verdict kept)."""
    from flexslim.latency import sessions

    monkeypatch.setattr(sessions, "cuda_usable", lambda: True)
    with pytest.raises(BadInput, match="--provider cuda: onnxruntime ran .*tiny.onnx on the CPU"):
        make_session(exported.path, "cuda", 1)


def test_a_fallback_during_timing_is_bad_input(exported, monkeypatch):
    """The session starts on CUDA and onnxruntime re-creates it on the CPU mid-timing (its run-time fallback):
    detected after the passes, BadInput, never a CPU timing reported as CUDA."""
    from flexslim.latency import runtime
    from flexslim.latency.runtime import Placement

    real = make_session(exported.path, "cpu", 1)

    class FallingBack:
        providers = [CUDA, CPU]

        def get_inputs(self):
            return real.get_inputs()

        def get_providers(self):
            return list(self.providers)

    fake = FallingBack()

    def runner(session, feeds, provider, options=None):
        def run():
            real.run(None, feeds)
            fake.providers = [CPU]  # what `set_providers(fallback)` leaves behind

        return run

    monkeypatch.setattr(runtime, "_runner", runner)
    with pytest.raises(BadInput, match="fell back to the CPU"):
        time_session(fake, TimingPlan(4, warmup=1, runs=2), where=Placement("cuda"))


def test_a_cuda_failure_during_timing_is_bad_input(exported, monkeypatch):
    from flexslim.latency import runtime
    from flexslim.latency.runtime import Placement

    real = make_session(exported.path, "cpu", 1)

    def runner(session, feeds, provider, options=None):
        def run():
            raise RuntimeError("CUDA failure 700: an illegal memory access was encountered")

        return run

    monkeypatch.setattr(runtime, "_runner", runner)
    with pytest.raises(BadInput, match="CUDA provider failed while timing .*illegal memory access"):
        time_session(real, TimingPlan(4, warmup=1, runs=2), where=Placement("cuda"))


@pytest.mark.gpu
def test_cuda_session_is_strict_on_a_gpu(exported):
    """On a GPU: no fallback at creation or in runs, every compute node on CUDA, and the timing says cuda."""
    import onnx

    from flexslim.latency.runtime import placement

    sess = make_session(exported.path, "cuda", 1)
    assert sess._enable_fallback is False  # disable_fallback(): a CUDA error in run() raises, no CPU re-run
    p = placement(sess, onnx.load(str(exported.path)).graph)
    assert p.provider == "cuda" and p.known
    t = time_session(sess, TimingPlan(batch=8, warmup=2, runs=5), where=p)
    assert t.provider == "cuda" and t.cpu_nodes == ()
