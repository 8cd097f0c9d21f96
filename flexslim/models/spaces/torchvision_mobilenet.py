"""torchvision's MobileNetV2 (`mobilenet_v2`) with one searched width per stage.

A stage is one row (t, c, n, s) of torchvision's inverted-residual setting: n blocks whose output width c is the
stage's width, the first with stride s. The expansion ratio t is kept: 1 for the first stage, 6 for the others
(torchvision's), so a block's hidden width is t x its input width. The stem (`stem_width`, 32) and the last 1x1
conv (`head_width`, 1280) are fixed. Modules are torchvision's own (`Conv2dNormActivation`, `InvertedResidual`)
under torchvision's names (features.0..18, classifier), so at torchvision's widths the state_dict is that of
`torchvision.models.mobilenet_v2` plus the `normalize.*` buffers.

One layout for every width: only the non-first blocks of a stage add their input (torchvision would also add it
to a first block whose input and output widths happen to be equal at stride 1).

Mask points: a block's projection BN carries its stage's mask; the expansion and depthwise BNs (t x the input
width) carry the INPUT stage's mask expanded t-fold. Every channel at or past a hard mask's cut-off is then
exactly zero, so the hard-masked supernet computes the dense network at the cut-off widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

from flexslim.models.arch import Arch
from flexslim.models.spaces.layers import Expanded, Normalize, norms

DROPOUT = 0.2  # torchvision's classifier dropout


def expansion(stage_index: int) -> int:
    """The expansion ratio t of a stage: torchvision's 1 for the first stage, 6 after."""
    return 1 if stage_index == 0 else 6


def _down(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


class TorchvisionMobileNetV2(nn.Module):
    """torchvision's MobileNetV2 with one searched output width per stage."""

    def __init__(self, arch: Arch, widths: dict[str, int], mask=None):
        super().__init__()

        def point(stage: str | None, ratio: int = 1) -> nn.Module | None:
            if mask is None or stage is None:  # None: the fixed stem
                return None
            return mask(stage) if ratio == 1 else Expanded(mask(stage), ratio)

        self.normalize = Normalize(arch.mean, arch.std)
        c, source = arch.stem_width, None  # source: the stage whose mask governs c's channels
        features: list[nn.Module] = [
            Conv2dNormActivation(arch.input_shape[0], c, stride=2, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)
        ]
        for i, spec in enumerate(arch.stages):
            t, w = expansion(i), int(widths[spec.name])
            for b in range(spec.blocks):
                hidden = [point(source, t) for _ in range(1 if t == 1 else 2)]
                stride = spec.stride if b == 0 else 1
                block = InvertedResidual(c, w, stride, t, norm_layer=norms(*hidden, point(spec.name)))
                block.use_res_connect = b > 0
                features.append(block)
                c, source = w, spec.name
        head = Conv2dNormActivation(c, arch.head_width, 1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)
        features.append(head)
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=DROPOUT), nn.Linear(arch.head_width, arch.num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(self.normalize(x)), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def cost_terms(arch: Arch, widths: dict) -> dict[str, torch.Tensor | float]:
    """Analytic cost of the width-dependent convs, grouped by output resolution (see torchvision_resnet's).

    The fixed stem conv and the classifier are constants and left out; the last 1x1 conv reads the last stage.
    """
    _, h, w_ = arch.input_shape
    terms: dict[str, torch.Tensor | float] = {}

    def conv(h: int, w_: int, c_in, c_out, k: int, groups_of_one: bool = False) -> None:
        res, hw = f"{h}x{w_}", h * w_ / 1e6
        terms[f"macs@{res}"] = terms.get(f"macs@{res}", 0.0) + hw * k * k * (c_out if groups_of_one else c_in * c_out)
        terms[f"act@{res}"] = terms.get(f"act@{res}", 0.0) + hw * c_out

    h, w_ = _down(h, 2), _down(w_, 2)
    c = arch.stem_width
    for i, spec in enumerate(arch.stages):
        t, w = expansion(i), widths[spec.name]
        for b in range(spec.blocks):
            stride = spec.stride if b == 0 else 1
            h2, w2 = _down(h, stride), _down(w_, stride)
            hidden = c * t
            if t != 1:
                conv(h, w_, c, hidden, 1)
            conv(h2, w2, hidden, hidden, 3, groups_of_one=True)  # depthwise
            conv(h2, w2, hidden, w, 1)
            h, w_, c = h2, w2, w
    conv(h, w_, c, arch.head_width, 1)
    return terms


def build(arch: Arch, widths: dict[str, int], mask=None, auxiliary: bool = False) -> TorchvisionMobileNetV2:
    """The family's entry point (see `flexslim.models.families`); no auxiliary head."""
    return TorchvisionMobileNetV2(arch, widths, mask)
