"""DARTS-cell family (the paper's space): stem 3x3 conv, stages of DARTS-V2 cells, 1x1 head.

Each stage is one or more cells sharing ONE width C; a cell's output is the concatenation of its four
nodes (4C channels) and feeds the next TWO cells (their preprocess 1x1 convs). Those concatenations are
"chunked" dimensions: channel c of node k sits at k*C + c, so when C changes the overlap is per chunk,
not a prefix. Layers whose input is such a concatenation carry `in_chunks` (see transplant.py), and the
latency model's cost terms include both couplings.

Deviation from the published network: after a reduction cell the next cell's preprocess0 is a single
stride-2 1x1 conv instead of DARTS's FactorizedReduce (two half-width convs concatenated), so every
produced channel keeps its index under masking and re-allocation.
"""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn

from flexslim.models.arch import Arch
from flexslim.models.spaces.layers import Normalize

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

# The published DARTS-V2 cells (Liu et al., second-order search on CIFAR-10).
DARTS_V2 = Genotype(
    normal=[
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1),
        ("skip_connect", 0),
        ("skip_connect", 0),
        ("dil_conv_3x3", 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 1),
        ("skip_connect", 2),
        ("max_pool_3x3", 1),
        ("max_pool_3x3", 0),
        ("skip_connect", 2),
        ("skip_connect", 2),
        ("max_pool_3x3", 1),
    ],
    reduce_concat=[2, 3, 4, 5],
)
MULTIPLIER = 4  # nodes concatenated into a cell's output


class ChunkedConv2d(nn.Conv2d):
    """A conv whose input channels are `in_chunks` equal concatenated blocks (transplant copies per block)."""

    def __init__(self, *args, in_chunks: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.in_chunks = in_chunks


class ChunkedLinear(nn.Linear):
    """A Linear whose input is a concatenation of `in_chunks` equal chunks (cell outputs), so re-allocation keeps
    each chunk's weights."""

    def __init__(self, *args, in_chunks: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.in_chunks = in_chunks


def _masked(mask, layers: list[nn.Module]) -> nn.Sequential:
    return nn.Sequential(*layers, *([mask()] if mask is not None else []))


def sep_conv(c: int, stride: int, mask) -> nn.Sequential:
    """DARTS' separable 3x3 convolution (twice relu, depthwise, pointwise, BN), masked where `mask` is given."""
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False),
        _masked(mask, [nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)]),
        nn.ReLU(inplace=False),
        nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False),
        _masked(mask, [nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)]),
    )


def dil_conv(c: int, stride: int, mask) -> nn.Sequential:
    """DARTS' dilated separable 3x3 convolution (relu, depthwise dilation 2, pointwise, BN)."""
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(c, c, 3, stride, 2, dilation=2, groups=c, bias=False),
        _masked(mask, [nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)]),
    )


def make_op(name: str, c: int, stride: int, mask) -> nn.Module:
    """The DARTS-V2 operation `name` at `c` channels and `stride`."""
    if name == "sep_conv_3x3":
        return sep_conv(c, stride, mask)
    if name == "dil_conv_3x3":
        return dil_conv(c, stride, mask)
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride, 1)
    if name == "skip_connect":
        return (
            nn.Identity()
            if stride == 1
            else _masked(mask, [nn.ReLU(inplace=False), nn.Conv2d(c, c, 1, stride, bias=False), nn.BatchNorm2d(c)])
        )
    raise ValueError(f"unknown op {name}")


def relu_conv_bn(c_in: int, c_out: int, stride: int, in_chunks: int, mask) -> nn.Sequential:
    """relu -> 1x1 conv -> BN (a cell's preprocessing), masked where `mask` is given."""
    return _masked(
        mask,
        [
            nn.ReLU(inplace=False),
            ChunkedConv2d(c_in, c_out, 1, stride, bias=False, in_chunks=in_chunks),
            nn.BatchNorm2d(c_out),
        ],
    )


def drop_path(x: torch.Tensor, p: float) -> torch.Tensor:
    """Drop whole samples' paths with probability `p` (scaled to keep the expectation)."""
    keep = 1.0 - p
    m = torch.bernoulli(torch.full((x.size(0), 1, 1, 1), keep, device=x.device, dtype=x.dtype))
    return x / keep * m


class Cell(nn.Module):
    """A DARTS-V2 normal or reduction cell: two preprocessed inputs, four nodes, the concatenation out."""

    def __init__(
        self, c_pp: int, chunks_pp: int, c_p: int, chunks_p: int, c: int, reduction: bool, reduction_prev: bool, mask
    ):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = relu_conv_bn(c_pp, c, 2 if reduction_prev else 1, chunks_pp, mask)
        self.preprocess1 = relu_conv_bn(c_p, c, 1, chunks_p, mask)
        ops, idx = (DARTS_V2.reduce, DARTS_V2.reduce_concat) if reduction else (DARTS_V2.normal, DARTS_V2.normal_concat)
        self.ops = nn.ModuleList(make_op(name, c, 2 if reduction and i < 2 else 1, mask) for name, i in ops)
        self.inputs = [i for _, i in ops]
        self.concat = list(idx)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(len(self.ops) // 2):
            total = 0
            for j in (2 * node, 2 * node + 1):
                h = self.ops[j](states[self.inputs[j]])
                if self.training and drop_prob > 0 and not isinstance(self.ops[j], nn.Identity):
                    h = drop_path(h, drop_prob)
                total = total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """Training-only classifier on the last reduction stage's output (weight `model.auxiliary_weight`)."""

    def __init__(self, c: int, chunks: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AdaptiveAvgPool2d(2),
            ChunkedConv2d(c, 128, 1, bias=False, in_chunks=chunks),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=False),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class DartsNet(nn.Module):
    """The DARTS-cell network: stem, stages of cells, global pool, linear head (and the auxiliary head)."""

    def __init__(self, arch: Arch, widths: dict[str, int], mask=None, auxiliary: bool = False):
        super().__init__()
        c_in = arch.input_shape[0]
        self.normalize = Normalize(arch.mean, arch.std)
        self.stem = nn.Sequential(
            nn.Conv2d(c_in, arch.stem_width, 3, padding=1, bias=False), nn.BatchNorm2d(arch.stem_width)
        )
        c_pp, ch_pp, c_p, ch_p = arch.stem_width, 1, arch.stem_width, 1
        reduction_prev = False
        cells = []
        self.aux_after = -1
        last_reduction = max((i for i, s in enumerate(arch.stages) if s.stride == 2), default=-1)
        for i, spec in enumerate(arch.stages):
            c = int(widths[spec.name])
            stage_mask = (lambda name=spec.name: mask(name)) if mask is not None else None
            for b in range(spec.blocks):
                reduction = spec.stride == 2 and b == 0
                cells.append(Cell(c_pp, ch_pp, c_p, ch_p, c, reduction, reduction_prev, stage_mask))
                reduction_prev = reduction
                c_pp, ch_pp, c_p, ch_p = c_p, ch_p, MULTIPLIER * c, MULTIPLIER
            if i == last_reduction:
                self.aux_after = len(cells) - 1
                aux_c = c_p
        self.cells = nn.ModuleList(cells)
        self.auxiliary = (
            AuxiliaryHead(aux_c, MULTIPLIER, arch.num_classes) if auxiliary and self.aux_after >= 0 else None
        )
        self.aux_logits: torch.Tensor | None = None
        if arch.head_width:
            self.head = nn.Sequential(
                nn.ReLU(inplace=False),
                ChunkedConv2d(c_p, arch.head_width, 1, bias=False, in_chunks=ch_p),
                nn.BatchNorm2d(arch.head_width),
                nn.ReLU(inplace=False),
            )
            self.classifier = nn.Linear(arch.head_width, arch.num_classes)
        else:
            self.head = nn.Identity()
            self.classifier = ChunkedLinear(c_p, arch.num_classes, in_chunks=ch_p)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop_path_prob = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(self.normalize(x))
        self.aux_logits = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_after and self.auxiliary is not None and self.training:
                self.aux_logits = self.auxiliary(s1)
        return self.classifier(torch.flatten(self.pool(self.head(s1)), 1))


def build(arch: Arch, widths: dict[str, int], mask=None, auxiliary: bool = False) -> DartsNet:
    """The family's entry point (see `flexslim.models.families`)."""
    return DartsNet(arch, widths, mask, auxiliary)


def cost_terms(arch: Arch, widths: dict) -> dict:
    """Analytic MACs (millions per image) and conv output elements (millions) per resolution, differentiable
    in the widths. A cell's cost depends on its own width AND on the two previous stages' widths (its
    preprocess convs read their 4C-channel outputs): the coupling the search must see."""
    h, w_ = arch.input_shape[1:]
    terms: dict = {}

    def add(key, value):
        terms[key] = terms.get(key, 0.0) + value

    c_pp = c_p = arch.stem_width  # channels (already multiplied by 4 for cell outputs)
    for spec in arch.stages:
        c = widths[spec.name]
        for b in range(spec.blocks):
            reduction = spec.stride == 2 and b == 0
            res, hw = f"{h}x{w_}", h * w_ / 1e6  # preprocess outputs live at s1's resolution
            add(f"macs@{res}", hw * (c_pp * c + c_p * c))
            add(f"act@{res}", hw * 2 * c)
            if reduction:
                h, w_ = -(-h // 2), -(-w_ // 2)
                add(f"act@{h}x{w_}", h * w_ / 1e6 * 5 * c)  # five max-pools
            else:
                add(f"macs@{res}", hw * (11 * c * c + 99 * c))  # 5 sep convs (2 dw+pw each) + 1 dil conv
                add(f"act@{res}", hw * 22 * c)
            c_pp, c_p = c_p, MULTIPLIER * c
    if arch.head_width:
        add(f"macs@{h}x{w_}", h * w_ / 1e6 * c_p * arch.head_width)
    else:
        add("macs@head", c_p * arch.num_classes / 1e6)
    return terms
