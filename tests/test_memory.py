"""Memory readings: live-tensor peak over a window of steps (profiler on the CPU), state bytes, resident set."""

from __future__ import annotations

import pytest
import torch

from flexslim.system.memory import SearchMemory, state_bytes, tensor_peak

MB = 2**20


def test_tensor_peak_sees_a_transient_tensor_of_known_size():
    def step():
        a = torch.empty(4 * MB // 4)  # 4 MB of float32, freed at return
        b = a + 1  # another 4 MB while `a` is alive
        del a, b

    got = tensor_peak(step, torch.device("cpu"), steps=2)
    assert got["tensor_source"].startswith("torch.profiler")
    assert 7.9 <= got["tensor_steps_mb"] <= 8.5  # both alive at once, nothing else
    assert got["tensor_state_mb"] == 0 and got["tensor_peak_mb"] == pytest.approx(got["tensor_steps_mb"])
    assert got["tensor_window_steps"] == 2


def test_tensors_kept_before_the_window_count_only_as_state():
    keep = torch.nn.Linear(1024, 1024)  # 4 MB of weights + 4 KB bias

    def step():
        keep(torch.ones(8, 1024)).sum()

    got = tensor_peak(step, torch.device("cpu"), steps=2, holders=[keep])
    assert got["tensor_state_mb"] == pytest.approx((1024 * 1024 + 1024) * 4 / MB)
    assert got["tensor_steps_mb"] < 0.5  # only the small activations


def test_state_bytes_counts_parameters_buffers_and_optimizer_state_once():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    params = sum(p.numel() for p in net.parameters()) * 4
    buffers = sum(b.untyped_storage().nbytes() for b in net.buffers())
    assert state_bytes(net) == params + buffers
    net(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()  # momentum buffers: one per parameter
    assert state_bytes(net, opt, net) == 2 * params + buffers


def test_a_wider_network_step_peaks_higher():
    def peak(width: int) -> float:
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(width, 10, 1)
        )
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        x = torch.rand(16, 3, 32, 32)

        def step():
            loss = net(x).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return tensor_peak(step, torch.device("cpu"), steps=2, holders=[net, opt])["tensor_peak_mb"]

    narrow, wide = peak(8), peak(32)
    assert wide > 1.5 * narrow > 0


def test_search_memory_on_the_cpu_reads_the_resident_set():
    m = SearchMemory(torch.device("cpu"))
    m.start()
    got = m.stop()
    assert got["kind"] == "peak RSS" and got["peak_mb"] > 0 and got["peak_mb"] >= got["rss_before_search_mb"] - 1
