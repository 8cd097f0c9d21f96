"""torchvision's ResNets (`resnet18`: basic blocks, `resnet50`: bottlenecks) with one searched width per stage.

The network is assembled from torchvision's own `BasicBlock` / `Bottleneck` under torchvision's module names
(conv1, bn1, layer1..4, fc), so at widths 64/128/256/512 its state_dict is that of
`torchvision.models.resnet18/50` plus the `normalize.*` buffers. Choices that keep ONE layout for every width
(the supernet, the baked network and every latency candidate share it):

- a stage's width is torchvision's `planes`: for a bottleneck, the inner width; its output is `expansion` (4) x it;
- the stem (conv1/bn1) produces layer1's channels, so the stem's width is layer1's width (64 = 64 in torchvision)
  and layer1's identity shortcuts hold at any width;
- the first block of a stage has a `downsample` projection unless it is a basic block of the first stage at
  stride 1 (exactly torchvision's layout at its own widths).

Mask points sit after every BN that produces a stage's channels (`MaskedBatchNorm2d`, no extra state); a
bottleneck's bn3 and downsample carry the stage mask expanded 4x, so every channel at or past a hard mask's
cut-off is exactly zero and the hard-masked supernet computes the dense network at the cut-off widths.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from flexslim.models.arch import Arch
from flexslim.models.spaces.layers import Expanded, Normalize, norms

BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"resnet18": BasicBlock, "resnet50": Bottleneck}


def _projects(stage_index: int, stride: int, expansion: int) -> bool:
    """Whether a stage's first block has a downsample projection (never a function of the widths)."""
    return stride != 1 or stage_index > 0 or expansion != 1


def _down(size: int, stride: int) -> int:
    """Output size of a conv / pool with 'same'-style padding at `stride` (torchvision's layers)."""
    return (size - 1) // stride + 1


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet-18/50 with one searched width per stage."""

    def __init__(self, arch: Arch, widths: dict[str, int], mask=None):
        super().__init__()
        block = BLOCKS[arch.family]
        e = block.expansion

        def point(stage: str, ratio: int = 1) -> nn.Module | None:
            if mask is None:
                return None
            return mask(stage) if ratio == 1 else Expanded(mask(stage), ratio)

        first = arch.stages[0].name
        c = int(widths[first])
        self.normalize = Normalize(arch.mean, arch.std)
        self.conv1 = nn.Conv2d(arch.input_shape[0], c, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norms(point(first))(c)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer_names: list[str] = []
        for i, spec in enumerate(arch.stages):
            w = int(widths[spec.name])
            blocks = []
            for b in range(spec.blocks):
                stride = spec.stride if b == 0 else 1
                downsample = None
                if b == 0 and _projects(i, stride, e):
                    downsample = nn.Sequential(conv1x1(c, w * e, stride), norms(point(spec.name, e))(w * e))
                bns = [point(spec.name), point(spec.name)] + ([point(spec.name, e)] if e != 1 else [])
                blocks.append(block(c, w, stride, downsample, norm_layer=norms(*bns)))
                c = w * e
            name = f"layer{i + 1}"  # torchvision's names, whatever the recipe calls its stages
            self.add_module(name, nn.Sequential(*blocks))
            self.layer_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c, arch.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        for name in self.layer_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cost_terms(arch: Arch, widths: dict) -> dict[str, torch.Tensor | float]:
    """Analytic cost of every conv and the classifier, grouped by the conv's output resolution.

    `macs@HxW`: multiply-accumulates (millions, per image) of the convs producing that resolution; `act@HxW`:
    their output elements (millions); `macs@head`: the classifier. Widths may be tensors (expected widths), so the
    terms are differentiable in them. Every term depends on a width (the stem follows layer1).
    """
    e = BLOCKS[arch.family].expansion
    c_img, h, w_ = arch.input_shape
    terms: dict[str, torch.Tensor | float] = {}

    def conv(h: int, w_: int, c_in, c_out, k: int) -> None:
        res, hw = f"{h}x{w_}", h * w_ / 1e6
        terms[f"macs@{res}"] = terms.get(f"macs@{res}", 0.0) + hw * k * k * c_in * c_out
        terms[f"act@{res}"] = terms.get(f"act@{res}", 0.0) + hw * c_out

    c = widths[arch.stages[0].name]
    h, w_ = _down(h, 2), _down(w_, 2)
    conv(h, w_, c_img, c, 7)
    h, w_ = _down(h, 2), _down(w_, 2)  # max pool
    for i, spec in enumerate(arch.stages):
        w = widths[spec.name]
        for b in range(spec.blocks):
            stride = spec.stride if b == 0 else 1
            h2, w2 = _down(h, stride), _down(w_, stride)
            if e == 1:
                conv(h2, w2, c, w, 3)
                conv(h2, w2, w, w, 3)
            else:  # torchvision's v1.5 bottleneck: the stride is on the 3x3 conv
                conv(h, w_, c, w, 1)
                conv(h2, w2, w, w, 3)
                conv(h2, w2, w, w * e, 1)
            if b == 0 and _projects(i, stride, e):
                conv(h2, w2, c, w * e, 1)
            h, w_, c = h2, w2, w * e
    terms["macs@head"] = c * arch.num_classes / 1e6
    return terms


def build(arch: Arch, widths: dict[str, int], mask=None, auxiliary: bool = False) -> TorchvisionResNet:
    """The family's entry point (see `flexslim.models.families`); no auxiliary head."""
    return TorchvisionResNet(arch, widths, mask)
