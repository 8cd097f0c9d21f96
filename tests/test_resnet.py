import dataclasses
from collections import Counter

import pytest
import torch
from torch import nn

from flexslim.errors import BadInput
from flexslim.models.arch import Arch
from flexslim.models.families import build_network
from flexslim.models.spaces.layers import Normalize
from flexslim.models.spaces.resnet import BasicBlock, ResNet
from flexslim.recipe.schema import StageSpec

DEEP = Arch(
    "resnet",
    (StageSpec("s1", 16, 2, 1), StageSpec("s2", 32, 3, 2), StageSpec("s3", 64, 2, 2)),
    (3, 16, 16),
    7,
    "cifar10",
    (0.5, 0.4, 0.3),
    (0.2, 0.25, 0.3),
    stem_width=16,
)


def _units(block: BasicBlock):
    return [u for u in (block.conv1, block.conv2, block.shortcut) if u is not None]


def _check_widths(net: ResNet, arch: Arch, widths: dict[str, int]):
    """Every conv of stage s produces exactly widths[s] channels, and reads what the previous layer produced."""
    assert isinstance(net, ResNet)
    assert net.stem[0][0].out_channels == arch.stem_width and net.stem[0][0].in_channels == arch.input_shape[0]
    c = arch.stem_width
    assert len(net.stages) == len(arch.stages)
    for spec, stage in zip(arch.stages, net.stages):
        w = widths[spec.name]
        assert len(stage) == spec.blocks
        for b, block in enumerate(stage):
            assert block.conv1[0].in_channels == c and block.conv1[0].out_channels == w
            assert block.conv2[0].in_channels == w and block.conv2[0].out_channels == w
            assert block.conv1[0].stride == ((spec.stride, spec.stride) if b == 0 else (1, 1))
            for unit in _units(block):
                assert unit[1].num_features == w  # BN matches its conv
            if block.shortcut is not None:
                assert block.shortcut[0].in_channels == c and block.shortcut[0].out_channels == w
            else:
                assert c == w and block.conv1[0].stride == (1, 1)  # identity shortcut only when shapes agree
            c = w
    assert net.classifier.in_features == (arch.head_width or c)
    assert net.classifier.out_features == arch.num_classes


@pytest.mark.parametrize(
    "widths",
    [
        {"s1": 16, "s2": 32, "s3": 64},
        {"s1": 8, "s2": 8, "s3": 8},
        {"s1": 24, "s2": 16, "s3": 40},
        {"s1": 1, "s2": 3, "s3": 5},
    ],
)
def test_builds_exactly_the_asked_widths(widths):
    net = build_network(DEEP, widths)
    _check_widths(net, DEEP, widths)
    assert net(torch.rand(2, *DEEP.input_shape)).shape == (2, DEEP.num_classes)


def test_default_widths_are_the_archs(tiny_arch):
    net = build_network(tiny_arch)
    _check_widths(net, tiny_arch, tiny_arch.widths)
    narrow = tiny_arch.with_widths({"stage3": 24})
    _check_widths(build_network(narrow), narrow, {"stage1": 8, "stage2": 16, "stage3": 24})


def test_head_width():
    arch = dataclasses.replace(DEEP, head_width=48)
    net = build_network(arch)
    _check_widths(net, arch, arch.widths)
    assert net.head[0][0].in_channels == 64 and net.head[0][0].out_channels == 48


@pytest.mark.parametrize("n", [1, 3])
def test_output_shape(tiny_arch, n):
    net = build_network(tiny_arch).eval()
    with torch.no_grad():
        assert net(torch.rand(n, *tiny_arch.input_shape)).shape == (n, tiny_arch.num_classes)


def test_normalization_is_inside_the_network():
    arch = DEEP
    net = build_network(arch)
    assert isinstance(net.normalize, Normalize)
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor(arch.mean).view(1, 3, 1, 1)) / torch.tensor(arch.std).view(1, 3, 1, 1)
    assert torch.allclose(net.normalize(x), expected, atol=1e-6)
    # buffers, so they travel in the state_dict and into the ONNX graph
    assert {"normalize.mean", "normalize.inv_std"} <= set(net.state_dict())


class Marker(nn.Identity):
    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage


def test_mask_factory_inserts_a_mask_after_every_unit_of_a_stage():
    calls = []

    def factory(stage):
        calls.append(stage)
        return Marker(stage)

    net = build_network(DEEP, mask=factory)
    for spec, stage in zip(DEEP.stages, net.stages):
        for block in stage:
            for unit in _units(block):
                assert isinstance(unit[0], nn.Conv2d) and isinstance(unit[1], nn.BatchNorm2d)
                assert isinstance(unit[2], Marker) and unit[2].stage == spec.name  # conv -> BN -> mask
    expected = {s.name: sum(len(_units(b)) for b in st) for s, st in zip(DEEP.stages, net.stages)}
    assert Counter(calls) == expected
    # stem and head carry no mask
    assert not any(isinstance(m, Marker) for m in net.stem.modules())
    # identity masks: the same function as the dense network with the same weights
    dense = build_network(DEEP).eval()
    net.load_state_dict(dense.state_dict())  # masks add no parameters: the keys agree
    x = torch.rand(3, *DEEP.input_shape)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), dense(x))


class HardMask(nn.Module):
    def __init__(self, channels: int, keep: int):
        super().__init__()
        self.register_buffer("m", (torch.arange(channels) < keep).float().view(1, -1, 1, 1))

    def forward(self, x):
        return x * self.m


def test_hard_masked_network_equals_the_dense_network_at_the_cut_off(randomize_batchnorm):
    """Oracle: zeroing channels >= k after every unit of stage s computes the dense network with width k there,
    whose weights are the leading slices of the wide network's."""
    wide = {"s1": 24, "s2": 32, "s3": 48}
    keep = {"s1": 9, "s2": 32, "s3": 17}
    torch.manual_seed(0)
    masked = randomize_batchnorm(build_network(DEEP, wide, mask=lambda s: HardMask(wide[s], keep[s])), seed=1).eval()
    dense = build_network(DEEP, keep).eval()
    sd = {k: v for k, v in masked.state_dict().items() if not k.endswith(".m")}
    sliced = {
        k: sd[k][tuple(slice(0, n) for n in v.shape)] if v.dim() else sd[k] for k, v in dense.state_dict().items()
    }
    dense.load_state_dict(sliced)
    x = torch.rand(4, *DEEP.input_shape)
    with torch.no_grad():
        assert torch.allclose(masked(x), dense(x), atol=1e-5)


def test_unknown_family():
    with pytest.raises(BadInput, match="family"):
        build_network(dataclasses.replace(DEEP, family="vgg"))
