"""GPU fast path: run only where CUDA is present (`pytest -m gpu`); skipped on a CPU machine."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_search_and_retrain_steps_run_on_cuda_with_bf16_and_channels_last():
    from flexslim.config import load_recipe
    from flexslim.devices import autocast, pick_device, prepare
    from flexslim.throughput import measure_throughput

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
    from flexslim.arch import Arch
    from flexslim.config import LatencyConfig, load_recipe
    from flexslim.latency import measure
    from flexslim.runtime import cuda_usable

    assert cuda_usable()
    r = load_recipe("quickstart")
    arch = Arch.from_model(r.model, (1, 16, 16), 10, "quickstart", (0.3,), (0.4,))
    t = measure(arch, arch.widths, LatencyConfig(provider="cuda", batch=32, warmup=5, runs=20))
    assert t.provider == "cuda" and t.p50_ms > 0
