"""The supernet: a family network built at the allocated widths with a mask at every point where a
stage's channels are produced, plus one mask (the architecture parameters) per stage.

The masks live outside the rebuilt body, so re-allocation swaps the body and keeps mu (and Adam's state).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from flexslim.arch import Arch
from flexslim.config import ModelConfig, SearchConfig
from flexslim.errors import BadInput
from flexslim.masks import GaussianMask, GumbelMask, dmask_options, hard_mask
from flexslim.spaces import build_network, cost_terms
from flexslim.transplant import transplant_state


class MaskPoint(nn.Module):
    """Multiplies a stage's channels by the stage's current mask (computed once per forward pass)."""

    def __init__(self, stage: str, store: dict[str, torch.Tensor]):
        super().__init__()
        self.stage, self._store = stage, store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._store[self.stage].to(x.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return self.stage


def gaussian_masks(arch: Arch, model: ModelConfig, search: SearchConfig) -> dict[str, GaussianMask]:
    """One GaussianMask per stage, mu at the recipe's width, kernels holding ceil(mu + k sigma) channels."""
    return {
        s.name: GaussianMask(
            s.width,
            search.sigma,
            math.ceil(s.width + search.k_sigma * search.sigma),
            model.min_width,
            search.step,
            model.round_to,
        )
        for s in arch.stages
    }


def gumbel_masks(arch: Arch, model: ModelConfig, search: SearchConfig) -> dict[str, GumbelMask]:
    """DMaskingNAS baseline: one GumbelMask per stage over the recipe's small or large fixed range."""
    if search.dmask_range not in ("small", "large"):
        raise BadInput(f"search.dmask_range must be small or large, got '{search.dmask_range}'")
    low, high = search.dmask_small if search.dmask_range == "small" else search.dmask_large
    return {
        s.name: GumbelMask(dmask_options(s.width, low, high, search.dmask_step, model.min_width), search.tau0)
        for s in arch.stages
    }


def make_masks(arch: Arch, model: ModelConfig, search: SearchConfig) -> dict[str, nn.Module]:
    if search.method == "flexcharts":
        return gaussian_masks(arch, model, search)
    if search.method == "dmask":
        return gumbel_masks(arch, model, search)
    raise BadInput(f"unknown search.method '{search.method}'; valid: flexcharts, dmask")


class Supernet(nn.Module):
    def __init__(self, arch: Arch, masks: dict[str, nn.Module]):
        super().__init__()
        self.arch = arch
        self.masks = nn.ModuleDict(masks)
        self._store: dict[str, torch.Tensor] = {}
        self._hard: dict[str, int] | None = None
        self.body = self._build(self.allocated())

    def _build(self, widths: dict[str, int]) -> nn.Module:
        return build_network(self.arch, widths, mask=lambda stage: MaskPoint(stage, self._store))

    def allocated(self) -> dict[str, int]:
        return {name: m.allocated for name, m in self.masks.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, m in self.masks.items():
            self._store[name] = (
                hard_mask(self._hard[name], m.allocated, x.device) if self._hard is not None else m.mask()
            )
        return self.body(x)

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.masks.parameters())

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.body.parameters())

    def expected_widths(self) -> dict[str, torch.Tensor]:
        return {name: m.expected_width() for name, m in self.masks.items()}

    def final_widths(self) -> dict[str, int]:
        return {name: m.final_width() for name, m in self.masks.items()}

    def expected_cost_terms(self) -> dict:
        return cost_terms(self.arch, self.expected_widths())

    def to_arch(self) -> Arch:
        return self.arch.with_widths(self.final_widths())

    @contextlib.contextmanager
    def hard(self, widths: dict[str, int] | None = None):
        """Within the block, masks are 0/1 at `widths` (default: the final widths): a dense net of those widths."""
        self._hard = dict(widths or self.final_widths())
        try:
            yield self
        finally:
            self._hard = None

    def reallocate(self, widths: dict[str, int]) -> nn.Module:
        """Rebuild the body at `widths` (allocated channels per stage), keeping every overlapping weight and
        BN statistic; returns the OLD body so the caller can carry optimizer state across."""
        old = self.body
        device = next(old.parameters()).device
        for name, m in self.masks.items():
            m.allocated = int(widths[name])
        new = self._build(self.allocated()).to(device)
        transplant_state(old, new)
        new.train(old.training)
        self.body = new
        return old

    def bake(self, widths: dict[str, int] | None = None) -> tuple[Arch, nn.Module]:
        """The plain dense network at the final widths, carrying the supernet's weights (prefix slices)."""
        arch = self.arch.with_widths(widths or self.final_widths())
        dense = build_network(arch).to(next(self.body.parameters()).device)
        transplant_state(self.body, dense)
        return arch, dense
