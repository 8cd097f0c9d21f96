"""The torchvision families (resnet18, resnet50, mobilenet_v2): torchvision's layer shapes at the recipes' widths,
the baked network equals the hard-masked supernet, the transplant keeps weights and momentum, a torchvision
checkpoint loads into the supernet (same output at the original widths), cost terms match FlopCounterMode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from flexslim.errors import BadInput
from flexslim.models.arch import Arch
from flexslim.models.families import build_network, cost_terms
from flexslim.models.pretrained import load_pretrained
from flexslim.models.spaces.layers import MaskedBatchNorm2d
from flexslim.models.transplant import transplant_optimizer
from flexslim.recipe.schema import ModelConfig, SearchConfig, StageSpec, load_recipe
from flexslim.search.masks import gaussian_masks
from flexslim.search.supernet import Supernet
from flexslim.train.loop import make_sgd

RECIPES = {"resnet18": "imagenet-resnet18", "resnet50": "imagenet-resnet50", "mobilenet_v2": "imagenet-mobilenetv2"}
FAMILIES = tuple(RECIPES)
MEAN, STD = (0.45, 0.4, 0.35), (0.25, 0.2, 0.3)


def recipe_arch(family: str, num_classes: int = 10, size: int = 32) -> Arch:
    """The shipped recipe's network (torchvision's widths) for `size` x `size` RGB images."""
    return Arch.from_model(load_recipe(RECIPES[family]).model, (3, size, size), num_classes, "folder", MEAN, STD)


def small_arch(family: str) -> Arch:
    """A few blocks per family at small widths, 3x32x32 input: quick to build, run and compare."""
    stages = {
        "resnet18": [("layer1", 8, 2, 1), ("layer2", 12, 1, 2), ("layer3", 16, 2, 2), ("layer4", 8, 1, 2)],
        "resnet50": [("layer1", 8, 2, 1), ("layer2", 12, 2, 2), ("layer3", 8, 1, 2), ("layer4", 8, 1, 2)],
        "mobilenet_v2": [("s1", 8, 1, 1), ("s2", 12, 2, 2), ("s3", 8, 2, 2), ("s4", 16, 2, 1), ("s5", 8, 1, 2)],
    }[family]
    return Arch(
        family, tuple(StageSpec(*s) for s in stages), (3, 32, 32), 5, "folder", MEAN, STD, stem_width=8, head_width=24
    )


def torchvision_model(family: str, num_classes: int) -> torch.nn.Module:
    return getattr(torchvision.models, family)(num_classes=num_classes)


def _shapes(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith("normalize.")}


@pytest.mark.parametrize("family", FAMILIES)
def test_recipe_widths_build_torchvisions_layer_shapes(family):
    arch = recipe_arch(family, num_classes=1000, size=224)
    net, ref = build_network(arch), torchvision_model(family, 1000)
    assert _shapes(net) == _shapes(ref)  # same state_dict keys, same shapes
    assert {"normalize.mean", "normalize.inv_std"} <= set(net.state_dict())  # normalisation inside the network
    assert not any(isinstance(m, MaskedBatchNorm2d) for m in net.modules())  # the dense net has plain BNs


@pytest.mark.parametrize("family", FAMILIES)
def test_baked_network_equals_the_hard_masked_supernet(family, randomize_batchnorm):
    arch = small_arch(family)
    torch.manual_seed(0)
    sn = Supernet(arch, gaussian_masks(arch, ModelConfig(min_width=4, round_to=4), SearchConfig(sigma=2.0)))
    randomize_batchnorm(sn.body, seed=1)
    sn.eval()
    widths = {s.name: max(4, s.width - 4 * (i % 2)) for i, s in enumerate(arch.stages)}  # some narrower, some not
    assert all(widths[n] < a for n, a in sn.allocated().items())
    x = torch.rand(3, *arch.input_shape)
    with torch.no_grad(), sn.hard(widths):
        masked = sn(x)
    baked_arch, dense = sn.dense(widths)
    assert baked_arch.widths == widths
    assert _shapes(dense) == _shapes(build_network(baked_arch))
    with torch.no_grad():
        assert torch.allclose(dense.eval()(x), masked, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_reallocation_keeps_weights_momentum_and_function(family, randomize_batchnorm):
    arch = small_arch(family)
    torch.manual_seed(0)
    sn = Supernet(arch, gaussian_masks(arch, ModelConfig(min_width=4, round_to=4), SearchConfig(sigma=2.0)))
    randomize_batchnorm(sn.body, seed=2)
    opt = make_sgd(sn.weight_parameters(), 0.1, 0.9, 0.0)
    sn.train()
    torch.nn.functional.cross_entropy(sn(torch.rand(4, *arch.input_shape)), torch.arange(4) % 5).backward()
    opt.step()
    sn.eval()
    x = torch.rand(2, *arch.input_shape)
    final = {s.name: s.width for s in arch.stages}
    with torch.no_grad(), sn.hard(final):
        before = sn(x)
    old_params = {k: p.detach().clone() for k, p in sn.body.named_parameters()}
    old_momentum = {k: opt.state[p]["momentum_buffer"].clone() for k, p in sn.body.named_parameters()}
    grown = {name: a + 3 for name, a in sn.allocated().items()}
    old_body = sn.reallocate(grown)
    new_opt = make_sgd(sn.weight_parameters(), 0.1, 0.9, 0.0)
    assert transplant_optimizer(opt, old_body, new_opt, sn.body) == len(old_params)
    for k, p in sn.body.named_parameters():
        region = tuple(slice(0, n) for n in old_params[k].shape)
        assert torch.equal(p.detach()[region], old_params[k]), k
        assert torch.equal(new_opt.state[p]["momentum_buffer"][region], old_momentum[k]), k
    with torch.no_grad(), sn.hard(final):
        assert torch.allclose(sn(x), before, atol=1e-5)  # new channels are masked off: the same function


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_torchvision_checkpoint_loads_into_the_supernet(family, tmp_path, randomize_batchnorm):
    torch.manual_seed(0)
    ref = randomize_batchnorm(torchvision_model(family, 10), seed=3).eval()
    path = tmp_path / f"{family}.pth"
    torch.save(ref.state_dict(), path)
    arch = recipe_arch(family)
    sn = Supernet(arch, gaussian_masks(arch, ModelConfig(), SearchConfig(sigma=4.0)))
    assert all(a > arch.widths[n] for n, a in sn.allocated().items())  # the supernet is wider than torchvision's
    assert load_pretrained(sn.body, path) == len(ref.state_dict())
    sn.eval()
    x = torch.rand(2, *arch.input_shape)
    normalized = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad(), sn.hard(arch.widths):  # masks all ones up to torchvision's widths
        assert torch.allclose(sn(x), ref(normalized), atol=1e-4)


def test_pretrained_skips_a_classifier_of_another_class_count_and_refuses_foreign_files(tmp_path):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in imagenet.state_dict().items()}}, path)  # DDP-style
    net = build_network(recipe_arch("resnet18"))
    fc = net.fc.weight.detach().clone()
    assert load_pretrained(net, path) == len(imagenet.state_dict()) - 2
    assert torch.equal(net.fc.weight, fc) and torch.equal(net.conv1.weight, imagenet.conv1.weight)
    with pytest.raises(BadInput, match="does not exist"):
        load_pretrained(net, tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(BadInput, match="not a torch checkpoint"):
        load_pretrained(net, tmp_path / "junk.pth")
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(BadInput, match="no tensor name"):
        load_pretrained(net, tmp_path / "other.pth")


def _counted_macs(arch: Arch, widths: dict[str, int]) -> float:
    net = build_network(arch, widths).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.rand(1, *arch.input_shape))
    return counter.get_total_flops() / 2  # FlopCounterMode counts a multiply-accumulate as 2 FLOPs


@pytest.mark.parametrize("family", FAMILIES)
def test_cost_terms_match_the_flop_counter(family):
    """The MAC terms equal FlopCounterMode's count up to the family's constant (width-independent) layers."""
    arch = recipe_arch(family)
    offsets = []
    for scale in (1.0, 0.5, 0.25):
        widths = {n: max(8, int(w * scale) + 3) for n, w in arch.widths.items()}
        terms = cost_terms(arch, widths)
        macs = 1e6 * sum(v for k, v in terms.items() if k.startswith("macs@"))
        offsets.append(_counted_macs(arch, widths) - macs)
    assert max(offsets) - min(offsets) < 1.0
    if family.startswith("resnet"):
        assert abs(offsets[0]) < 1.0  # every resnet layer depends on a width (the stem follows layer1)


@pytest.mark.parametrize("family", FAMILIES)
def test_cost_terms_are_differentiable_in_every_width(family):
    arch = recipe_arch(family)
    widths = {n: torch.tensor(float(w), requires_grad=True) for n, w in arch.widths.items()}
    total = sum(cost_terms(arch, widths).values())
    total.backward()
    assert all(float(w.grad) > 0 for w in widths.values())


def test_mobilenet_residuals_do_not_depend_on_widths():
    arch = small_arch("mobilenet_v2")
    equal = dataclasses.replace(arch).with_widths({"s3": 16, "s4": 16})  # s4's first block: 16 -> 16 at stride 1
    blocks = [m for m in build_network(equal).features if hasattr(m, "use_res_connect")]
    assert [b.use_res_connect for b in blocks] == [False, False, True, False, True, False, True, False]
