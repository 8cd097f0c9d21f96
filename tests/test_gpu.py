"""GPU fast path: run only where CUDA is present (`pytest -m gpu`); skipped on a CPU machine."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_search_and_retrain_steps_run_on_cuda_with_bf16_and_channels_last():
    from flexslim.bench.throughput import measure_throughput
    from flexslim.recipe.schema import load_recipe
    from flexslim.system.devices import autocast, pick_device, prepare

    recipe = load_recipe("quickstart")
    dev = pick_device("auto")
    assert dev.type == "cuda"
    t = measure_throughput(recipe, (1, 16, 16), 10, dev, steps=3, warmup=1)
    assert t["search_images_per_s"] > 0 and t["retrain_images_per_s"] > 0
    conv = torch.nn.Conv2d(3, 8, 3)
    prepare(conv, dev)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with autocast(dev):
        y = conv(torch.rand(2, 3, 8, 8, device=dev))
    assert y.dtype == torch.bfloat16


def test_latency_runs_on_the_cuda_provider(tmp_path):
    from flexslim.latency.profiling import measure
    from flexslim.latency.runtime import cuda_usable
    from flexslim.models.arch import Arch
    from flexslim.recipe.schema import LatencyConfig, load_recipe

    assert cuda_usable()
    r = load_recipe("quickstart")
    arch = Arch.from_model(r.model, (1, 16, 16), 10, "quickstart", (0.3,), (0.4,))
    t = measure(arch, arch.widths, LatencyConfig(provider="cuda", batch=32, warmup=5, runs=20))
    assert t.provider == "cuda" and t.p50_ms > 0


def test_a_search_epoch_on_cuda_runs_bf16_and_channels_last():
    from search_fixtures import SMALL_MODEL, hand_latency_model, small_arch

    from flexslim.data.tensors import Dataset
    from flexslim.latency.budget import Budget
    from flexslim.recipe.schema import Recipe, SearchConfig
    from flexslim.search.loop import run_search

    dev = torch.device("cuda")
    arch = small_arch()
    g = torch.Generator().manual_seed(0)
    ds = Dataset(
        "quickstart",
        torch.rand(256, 1, 16, 16, generator=g),
        torch.randint(0, 10, (256,), generator=g),
        torch.rand(32, 1, 16, 16, generator=g),
        torch.randint(0, 10, (32,), generator=g),
        10,
        (0.3,),
        (0.35,),
    ).to(dev)
    seen: dict[str, object] = {}

    def spy(module, inputs, output):
        seen.setdefault("dtype", output.dtype)
        seen.setdefault("channels_last", inputs[0].is_contiguous(memory_format=torch.channels_last))

    import flexslim.search.loop as search

    build = search.build_state

    def build_with_spy(*a, **k):
        st = build(*a, **k)
        conv = next(m for m in st.supernet.body.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        conv.register_forward_hook(spy)
        return st

    recipe = Recipe(model=SMALL_MODEL, search=SearchConfig(epochs=1, batch_size=32))
    search.build_state = build_with_spy
    try:
        st = run_search(arch, recipe, ds, budget=Budget(1.0), latency=hand_latency_model(arch), device=dev)
    finally:
        search.build_state = build
    assert seen == {"dtype": torch.bfloat16, "channels_last": True}
    assert all(p.is_cuda for p in st.supernet.parameters())
    assert len(st.history) == 1 and torch.isfinite(torch.tensor(st.history[0]["weight_loss"]))


def test_validate_on_the_cuda_provider_binds_io_and_reports_cuda(exported, monkeypatch):
    import onnxruntime as ort

    from flexslim.deploy.gate import Measurement, validate

    calls = {"n": 0}
    run = ort.InferenceSession.run_with_iobinding

    def counting(self, *a, **k):
        calls["n"] += 1
        return run(self, *a, **k)

    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", counting)
    measure = Measurement(batch=32, warmup=3, runs=10, min_seconds=0)
    rep = validate(exported.path, latency_ms=100.0, provider="cuda", measure=measure)
    assert rep.timing.provider == "cuda" and rep.to_dict()["provider"] == "cuda"
    assert calls["n"] >= 13  # every warm-up and timed run went through IO binding
    assert rep.passed


def test_the_quickstart_job_on_cuda_passes_export_and_the_gate(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from flexslim.cli import app
    from flexslim.jobs.latency import profile_job

    monkeypatch.chdir(tmp_path)
    fast = ["--set", "search.epochs=3", "--set", "train.epochs=3", "--set", "latency.min_seconds=0.2"]
    table = profile_job("quickstart", ["latency.provider=cuda", "latency.min_seconds=0.2"], tmp_path / "t.json")
    floor = table.floor_ms
    budget = f"{3 * floor:.5f}"  # room above the floor on this GPU, whatever it is
    cli = CliRunner()
    res = cli.invoke(
        app,
        ["search", "--recipe", "quickstart", "--latency-ms", budget, "--device", "cuda", "--provider", "cuda", *fast],
    )
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "runs" / "latest" / "run.json").read_text())
    assert run["latency"]["provider"] == "cuda" and run["device"].startswith("cuda")
    res = cli.invoke(app, ["export", "model.onnx", "--provider", "cuda"])
    assert res.exit_code == 0, res.output  # the gate passed: measured within the budget on CUDA
    assert "cuda" in res.output


def test_tensor_peak_on_cuda_reads_max_memory_allocated():
    from flexslim.system.memory import tensor_peak

    dev = torch.device("cuda")

    def step():
        a = torch.empty(2**20, device=dev)  # 4 MB
        del a

    got = tensor_peak(step, dev, steps=2)
    assert got["tensor_source"] == "torch.cuda.max_memory_allocated"
    assert 3.9 <= got["tensor_steps_mb"] <= 4.5 and got["cuda_max_allocated_mb"] >= got["tensor_steps_mb"]


@pytest.mark.slow
def test_the_bench_memory_figure_comes_from_cuda(tmp_path):
    from search_fixtures import TINY_SET

    from flexslim.bench.run import BenchRequest, run_bench

    sets = [
        *TINY_SET,
        "search.epochs=1",
        "latency.samples=4",
        "latency.holdout=1",
        "latency.min_seconds=0",
        "latency.bake_seconds=0",
    ]
    request = BenchRequest(
        "quickstart", ("flexcharts", "dmask-large"), tmp_path / "b", budget_ms=5.0, overrides=tuple(sets), device="cuda"
    )
    rows = run_bench(request)
    for r in rows:
        assert "error" not in r, r
        assert r["device"].startswith("cuda") and r["tensor_source"] == "torch.cuda.max_memory_allocated"
        assert r["cuda_max_allocated_mb"] > 0 and r["tensor_peak_mb"] > 0
    assert "GPU memory (max allocated)" in (tmp_path / "b" / "bench.md").read_text()
