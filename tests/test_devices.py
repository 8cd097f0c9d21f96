"""devices.cpu_training_kernels: narrow nets on the CPU train on native kernels (oneDNN stalled on 4-channel convs)."""

import subprocess
import sys
import textwrap

import torch

from flexslim.system.devices import NARROW_CHANNELS, cpu_training_kernels, needs_native_kernels


def test_only_narrow_nets_on_the_cpu_need_native_kernels():
    assert needs_native_kernels("cpu", [16, 4, 32]) and needs_native_kernels("cpu", [NARROW_CHANNELS - 1])
    assert not needs_native_kernels("cpu", [8, 16, 64]) and not needs_native_kernels("cpu", [])
    assert not needs_native_kernels("cuda", [4])  # only the CPU path changes; no CUDA device needed to ask


def test_the_setting_is_restored(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    with cpu_training_kernels("cpu", [4, 8]) as native:
        assert native and torch.backends.mkldnn.enabled is False
    assert torch.backends.mkldnn.enabled is True
    with cpu_training_kernels("cpu", [8, 16]) as native:
        assert not native and torch.backends.mkldnn.enabled is True
    try:
        with cpu_training_kernels("cpu", [4]):
            raise ValueError
    except ValueError:
        pass
    assert torch.backends.mkldnn.enabled is True


def test_a_4_channel_net_trains_without_hanging():
    """A few SGD steps of a net with 4-channel 1x1 and 3x3 convs, in a fresh process (oneDNN on by default there),
    under a timeout: a stall fails the test instead of hanging the suite."""
    code = textwrap.dedent(
        """
        import torch
        from torch import nn
        from flexslim.system.devices import cpu_training_kernels
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                            nn.Conv2d(16, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.Conv2d(4, 8, 1, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        x, y = torch.rand(64, 1, 32, 32), torch.randint(0, 10, (64,))
        with cpu_training_kernels("cpu", [16, 4, 8]) as native:
            assert native and not torch.backends.mkldnn.enabled
            for _ in range(5):
                loss = nn.functional.cross_entropy(net(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
        assert torch.isfinite(loss)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
