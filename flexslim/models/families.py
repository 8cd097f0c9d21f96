"""Search-space families. Each builds a network from an Arch and a dict of per-stage widths.

`recipe.choices.FAMILIES` is the one table of families: name -> the module that implements it. A family module
fulfils the `Family` protocol below (build, cost_terms); the networks it builds may carry the optional members
`NetworkExtras` names (drop-path, an auxiliary head).

`build_network(arch, widths=None, mask=None)`: with `mask=None` the plain dense network at `widths`
(default: the arch's own); with `mask` (stage name -> nn.Module) the same network with a mask point
wherever a stage's channels are produced: that is the supernet body.

This module imports no torch at load time, so the CLI and `arch.py` can read the table cheaply.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Protocol, cast

from flexslim.errors import BadInput
from flexslim.recipe.choices import FAMILIES

if TYPE_CHECKING:
    from torch import nn

    from flexslim.models.arch import Arch

MaskFactory = Callable[[str], "nn.Module"]


class Family(Protocol):
    """What a family module provides. Example (`models/spaces/resnet.py`)::

    def build(arch, widths, mask=None, auxiliary=False) -> nn.Module: ...   # stem, stages, head at `widths`
    def cost_terms(arch, widths) -> dict: ...                                # {"conv:stage1": macs, ...}
    """

    def build(self, arch: Arch, widths: dict, mask: MaskFactory | None, auxiliary: bool) -> nn.Module:
        """The network at `widths`; with `mask` (stage name -> module) a mask point wherever a stage's channels
        are produced (the supernet body); `auxiliary` adds a training-only auxiliary head where the family has one."""
        ...

    def cost_terms(self, arch: Arch, widths: dict) -> dict:
        """Analytic cost terms (e.g. MACs per layer kind), differentiable in the widths (floats or tensors)."""
        ...


class NetworkExtras(Protocol):
    """Optional members of a built network: `drop_path_prob` (set per epoch by `train.schedules.set_drop_path`;
    families without drop-path leave it out) and `aux_logits` (the auxiliary head's output after a forward pass,
    training only)."""

    drop_path_prob: float
    aux_logits: object


def family_module(name: str) -> Family:
    """The module implementing family `name`; BadInput naming the known families otherwise."""
    if name not in FAMILIES:
        raise BadInput(f"unknown family '{name}'; valid: {', '.join(FAMILIES)}")
    module: ModuleType = importlib.import_module(FAMILIES[name])
    missing = [f for f in ("build", "cost_terms") if not callable(getattr(module, f, None))]
    if missing:  # a broken table entry is a bug in flexslim, not the user's input
        raise TypeError(f"family module {FAMILIES[name]} lacks {', '.join(missing)} (see models.families.Family)")
    return cast(Family, module)


def build_network(
    arch: Arch, widths: dict[str, int] | None = None, mask: MaskFactory | None = None, auxiliary: bool = False
) -> nn.Module:
    """The family's network at `widths` (default: the arch's own).

    `auxiliary` adds the DARTS family's training-only auxiliary head (its logits land in `.aux_logits`);
    families without one ignore it.
    """
    widths = dict(arch.widths if widths is None else widths)
    return family_module(arch.family).build(arch, widths, mask, auxiliary)


def cost_terms(arch: Arch, widths: dict) -> dict:
    """The family's analytic, width-differentiable cost terms (see each family's `cost_terms`)."""
    return family_module(arch.family).cost_terms(arch, widths)
