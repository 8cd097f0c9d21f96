"""Search-space families. Each builds a network from an Arch and a dict of per-stage widths.

`build_network(arch, widths=None, mask=None)`: with `mask=None` the plain dense network at `widths`
(default: the arch's own); with `mask` (stage name -> nn.Module) the same network with a mask point
wherever a stage's channels are produced: that is the supernet body.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from flexslim.arch import Arch
from flexslim.errors import BadInput

MaskFactory = Callable[[str], nn.Module]


def build_network(
    arch: Arch, widths: dict[str, int] | None = None, mask: MaskFactory | None = None, auxiliary: bool = False
) -> nn.Module:
    """`auxiliary` adds the DARTS family's training-only auxiliary head (its logits land in `.aux_logits`)."""
    widths = dict(arch.widths if widths is None else widths)
    if arch.family == "resnet":
        from flexslim.spaces.resnet import ResNet

        return ResNet(arch, widths, mask)
    if arch.family == "darts":
        from flexslim.spaces.darts import DartsNet

        return DartsNet(arch, widths, mask, auxiliary)
    raise BadInput(f"unknown family '{arch.family}' (known: resnet, darts)")


def cost_terms(arch: Arch, widths: dict) -> dict:
    """The family's analytic, width-differentiable cost terms (see each family's `cost_terms`)."""
    if arch.family == "resnet":
        from flexslim.spaces.resnet import cost_terms as terms
    elif arch.family == "darts":
        from flexslim.spaces.darts import cost_terms as terms
    else:
        raise BadInput(f"unknown family '{arch.family}' (known: resnet, darts)")
    return terms(arch, widths)
