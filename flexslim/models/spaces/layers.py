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


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d followed by a mask point. The mask holds no state, so the state_dict keys are a plain BN's:
    a torchvision block built with it (as its `norm_layer`) keeps torchvision's parameter names."""

    def __init__(self, num_features: int, mask: nn.Module):
        super().__init__(num_features)
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask(super().forward(x))


class Expanded(nn.Module):
    """A stage's mask applied to a group of `ratio` x the stage's channels (prefix layout): channel c follows the
    stage's channel c // ratio, so ratio * w channels survive a hard mask at width w."""

    def __init__(self, mask: nn.Module, ratio: int):
        super().__init__()
        self.mask, self.ratio = mask, int(ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape  # (n, c, h, w) -> (n, c / ratio, ratio * h, w): dim 1 indexes c // ratio
        return self.mask(x.reshape(n, c // self.ratio, self.ratio * h, w)).reshape(n, c, h, w)


def norms(*masks: nn.Module | None) -> Callable[[int], nn.BatchNorm2d]:
    """A torchvision `norm_layer` that hands out BNs in call order, the i-th followed by masks[i] (plain when None)."""
    queue = iter(masks)

    def norm_layer(channels: int) -> nn.BatchNorm2d:
        mask = next(queue)
        return nn.BatchNorm2d(channels) if mask is None else MaskedBatchNorm2d(channels, mask)

    return norm_layer
