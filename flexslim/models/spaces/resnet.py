"""CIFAR-style residual family: stem, stages of basic blocks (one width per stage), pooled linear head.

The first block of every stage has a projection shortcut whatever the widths, so the network's structure
never depends on whether two widths happen to be equal (the supernet, the baked net and every candidate
of the latency model share one layout).

Every unit that produces a stage's channels (both convs of each block and the projection shortcut) ends
in that stage's mask point when a mask factory is given. Channels at or past a hard mask's cut-off are
then exactly zero everywhere in the stage, so the hard-masked supernet computes the dense network at the
cut-off widths.
"""

from __future__ import annotations

import torch
from torch import nn

from flexslim.models.arch import Arch
from flexslim.models.spaces.layers import Normalize, conv_bn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN(-mask) units with a residual (1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, project: bool, mask=None):
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, 3, stride, mask=mask)
        self.conv2 = conv_bn(c_out, c_out, 3, 1, mask=mask)
        self.shortcut = conv_bn(c_in, c_out, 1, stride, mask=mask) if project else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.conv1(x)))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """The CIFAR-style residual family: stem, stages of basic blocks, global pool, linear head."""

    def __init__(self, arch: Arch, widths: dict[str, int], mask=None):
        super().__init__()
        c_in = arch.input_shape[0]
        self.normalize = Normalize(arch.mean, arch.std)
        self.stem = nn.Sequential(conv_bn(c_in, arch.stem_width, 3), nn.ReLU(inplace=True))
        c = arch.stem_width
        stages = []
        for spec in arch.stages:
            w = int(widths[spec.name])
            stage_mask = (lambda name=spec.name: mask(name)) if mask is not None else None
            blocks = []
            for b in range(spec.blocks):
                blocks.append(BasicBlock(c, w, spec.stride if b == 0 else 1, b == 0, stage_mask))
                c = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        if arch.head_width:
            self.head = nn.Sequential(conv_bn(c, arch.head_width, 1), nn.ReLU(inplace=True))
            c = arch.head_width
        else:
            self.head = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, arch.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        for stage in self.stages:
            x = stage(x)
        return self.classifier(torch.flatten(self.pool(self.head(x)), 1))


def cost_terms(arch: Arch, widths: dict) -> dict[str, torch.Tensor | float]:
    """Analytic cost of the width-dependent layers, grouped by feature-map resolution.

    `macs@HxW`: multiply-accumulates (millions, per image) of the convs running at that resolution;
    `act@HxW`: output elements (millions) of those convs. Widths may be tensors (expected widths), so the
    terms are differentiable in them. The fixed stem is a constant and left out.
    """
    _, h, w_ = arch.input_shape
    c_in = arch.stem_width
    terms: dict[str, torch.Tensor | float] = {}

    def add(key, value):
        terms[key] = terms.get(key, 0.0) + value

    for spec in arch.stages:
        w = widths[spec.name]
        h, w_ = -(-h // spec.stride), -(-w_ // spec.stride)
        res = f"{h}x{w_}"
        hw = h * w_ / 1e6
        add(f"macs@{res}", hw * (9 * c_in * w + c_in * w + 9 * w * w * (2 * spec.blocks - 1)))
        add(f"act@{res}", hw * w * (2 * spec.blocks + 1))
        c_in = w
    if arch.head_width:
        add(f"macs@{h}x{w_}", h * w_ / 1e6 * c_in * arch.head_width)
    else:
        add("macs@head", c_in * arch.num_classes / 1e6)
    return terms


def build(arch: Arch, widths: dict[str, int], mask=None, auxiliary: bool = False) -> ResNet:
    """The family's entry point (see `flexslim.models.families`); this family has no auxiliary head."""
    return ResNet(arch, widths, mask)
