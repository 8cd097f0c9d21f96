"""The prune-and-fine-tune baseline (`bench --methods prune`): the family trained at a wider start, its channels
pruned to given widths by group L2 magnitude over Torch-Pruning's dependency graph, then fine-tuned.

Torch-Pruning is an optional extra (`pip install 'flexslim[compare]'`): the bench names it when it is missing,
before anything is trained. The widths come from the bench (a uniform ratio bisected on measured latency, then the
same measured bake as every method); this module only slices channels: for every dependency group of a stage (the
residual group: both convs' outputs of the stage's first block, its projection and every later block's outputs; each
block's inner conv on its own), the channels with the smallest L2 norm over the whole group are removed until the
stage's width is left. The stem and the classifier are never pruned.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from flexslim.errors import BadInput
from flexslim.models.arch import Arch

_STAGE = re.compile(r"^stages\.(\d+)\.")  # module names of the residual family's stages


def require_torch_pruning():
    """The torch_pruning module; BadInput (one line, the install command) when it is not installed."""
    try:
        import torch_pruning
    except ImportError:
        raise BadInput(
            "bench method prune needs Torch-Pruning, an optional extra: pip install 'flexslim[compare]' "
            "(or pip install torch-pruning)"
        ) from None
    return torch_pruning


def wide_arch(arch: Arch, factor: float, grid: int) -> Arch:
    """The family at `factor` x the recipe's widths, each rounded up to the grid: where pruning starts."""
    if factor < 1:
        raise BadInput(f"bench.prune_start must be >= 1 (the network is pruned down from it), got {factor:g}")
    return arch.with_widths({s: grid * math.ceil(factor * w / grid) for s, w in arch.widths.items()})


def prune_channels(model: nn.Module, arch: Arch, widths: dict[str, int]) -> nn.Module:
    """`model` (the trained network at `arch`'s widths) pruned in place to `widths` (every one at most the stage's
    width in `arch`): per dependency group, the channels of least group L2 norm go. Returns the model, whose state
    dict then loads into the family built at `widths` (checked: BadInput otherwise)."""
    from flexslim.models.families import build_network

    tp = require_torch_pruning()
    if arch.family != "resnet":
        raise BadInput(f"bench method prune supports the residual family (resnet), not {arch.family}")
    too_wide = {s: w for s, w in widths.items() if w > arch.widths[s]}
    if too_wide:
        raise BadInput(f"cannot prune {arch.widths} up to {too_wide}: raise bench.prune_start")
    model = model.eval()
    stage_of = {}
    for name, module in model.named_modules():
        if (m := _STAGE.match(name)) and isinstance(module, nn.Conv2d):
            stage_of[module] = arch.stages[int(m.group(1))].name
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(2, *arch.input_shape))
    fixed = [model.classifier, *(m for m in model.modules() if isinstance(m, nn.Conv2d) and m not in stage_of)]
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    cuts = []  # (root conv, channels to remove): decided on the unpruned weights, groups are disjoint
    for group in graph.get_all_groups(ignored_layers=fixed, root_module_types=(nn.Conv2d,)):
        root = group[0].dep.target.module
        drop = root.out_channels - widths[stage_of[root]]
        if drop > 0:
            cuts.append((root, importance(group).argsort()[:drop].tolist()))
    for root, idxs in cuts:
        graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs).prune()
    target = build_network(arch.with_widths(widths))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    if got != want:
        bad = sorted(k for k in want if got.get(k) != want[k])[:3]
        raise BadInput(f"pruning to {widths} did not give the family's layout (first mismatches: {bad})")
    return model
