"""Layers shared by the families: input normalisation inside the network, conv-BN(-mask) units."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, so the network (and its ONNX export) takes images in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


def conv_bn(
    c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, mask: Callable[[], nn.Module] | None = None
) -> nn.Sequential:
    """Conv (no bias) -> BN -> optional mask point; the mask multiplies the channels this unit produces."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if mask is not None:
        layers.append(mask())
    return nn.Sequential(*layers)
