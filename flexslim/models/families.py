"""Search-space families. Each builds a network from an Arch and a dict of per-stage widths.

`FAMILIES` is the one table of families: name -> the module that implements it. A family module has

    build(arch, widths, mask, auxiliary) -> nn.Module   the network at `widths` (a mask point per stage
                                                          where `mask` is given: the supernet body)
    cost_terms(arch, widths) -> dict                     analytic, width-differentiable cost terms

`build_network(arch, widths=None, mask=None)`: with `mask=None` the plain dense network at `widths`
(default: the arch's own); with `mask` (stage name -> nn.Module) the same network with a mask point
wherever a stage's channels are produced: that is the supernet body.

This module imports no torch at load time, so the CLI and `arch.py` can read the table cheaply.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

from flexslim.errors import BadInput

if TYPE_CHECKING:
    from torch import nn

    from flexslim.models.arch import Arch
from flexslim.recipe.choices import FAMILIES

MaskFactory = Callable[[str], "nn.Module"]


def family_module(name: str) -> ModuleType:
    """The module implementing family `name`; BadInput naming the known families otherwise."""
    if name not in FAMILIES:
        raise BadInput(f"unknown family '{name}'; valid: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


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
