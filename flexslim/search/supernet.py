"""The supernet: a family network built at the allocated widths with a mask at every point where a
stage's channels are produced, plus one mask (the architecture parameters) per stage.

The masks live outside the rebuilt body, so re-allocation swaps the body and keeps mu (and Adam's state).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from flexslim.models.arch import Arch
from flexslim.models.families import build_network, cost_terms
from flexslim.models.transplant import transplant_state
from flexslim.recipe.schema import ModelConfig, SearchConfig
from flexslim.search import methods
from flexslim.search.masks import Mask, gaussian_masks, gumbel_masks, hard_mask  # noqa: F401 (factories re-exported)
from flexslim.train.schedules import set_drop_path


class MaskPoint(nn.Module):
    """Multiplies a stage's channels by the stage's current mask (computed once per forward pass)."""

    def __init__(self, stage: str, store: dict[str, torch.Tensor]):
        super().__init__()
        self.stage, self._store = stage, store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._store[self.stage].to(x.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return self.stage


def make_masks(arch: Arch, model: ModelConfig, search: SearchConfig) -> dict[str, Mask]:
    """One mask per stage of `arch`, of the kind search.method names (BadInput for an unknown method)."""
    return methods.mask_factory(search.method)(arch, model, search)


class Supernet(nn.Module):
    """A family network at the masks' allocated widths, with every stage's channels scaled by its mask.

    Args:
        arch: the family, stages and data shape; its stage widths are not used (the masks' are).
        masks: one `Mask` per stage name of `arch` (all of one kind, see `make_masks`).
        body_fn: applied to every body built (the first and each re-allocated one), e.g.
            `collectives.sync_batchnorm`; default: none.

    `arch_parameters()` (the masks') and `weight_parameters()` (the body's) are disjoint and cover all
    parameters. `reallocate` rebuilds the body at new widths; `hard()` and `dense()` give the dense network at
    the final widths.
    """

    def __init__(self, arch: Arch, masks: dict[str, Mask], body_fn=None):
        super().__init__()
        self.arch = arch
        self._body_fn = body_fn or (lambda body: body)
        self.masks = nn.ModuleDict(masks)
        self._store: dict[str, torch.Tensor] = {}
        self._hard: dict[str, int] | None = None
        self.body = self._build(self.allocated())

    def _build(self, widths: dict[str, int]) -> nn.Module:
        return self._body_fn(build_network(self.arch, widths, mask=lambda stage: MaskPoint(stage, self._store)))

    def allocated(self) -> dict[str, int]:
        """Channels each stage's kernels hold now."""
        return {name: m.allocated for name, m in self.masks.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, m in self.masks.items():
            self._store[name] = (
                hard_mask(self._hard[name], m.allocated, x.device) if self._hard is not None else m.mask()
            )
        return self.body(x)

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters (every mask's mu or logits)."""
        return list(self.masks.parameters())

    def weight_parameters(self) -> list[nn.Parameter]:
        """The network's weights (the body), trained by the weights step."""
        return list(self.body.parameters())

    def arch_lr(self, cfg: SearchConfig) -> float:
        """The architecture optimizer's learning rate: the masks' kind picks it from [search]."""
        lrs = {m.arch_lr(cfg) for m in self.masks.values()}
        if len(lrs) != 1:
            raise ValueError(f"the masks disagree on the architecture learning rate: {sorted(lrs)}")
        return lrs.pop()

    def expected_widths(self) -> dict[str, torch.Tensor]:
        """Stage -> expected width under its option weights (differentiable)."""
        return {name: m.expected_width() for name, m in self.masks.items()}

    def width_distributions(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each stage's (options, weights) for the latency term (Mask.width_distribution)."""
        return {name: m.width_distribution() for name, m in self.masks.items()}

    def mean_widths(self) -> dict[str, float]:
        """Each stage's Mask.mean_width() (mu for FlexCHarts), channels."""
        return {name: m.mean_width() for name, m in self.masks.items()}

    def final_widths(self) -> dict[str, int]:
        """Stage -> the width each mask settles on."""
        return {name: m.final_width() for name, m in self.masks.items()}

    def expected_cost_terms(self) -> dict:
        """The family's cost terms at the expected widths (differentiable in the masks)."""
        return cost_terms(self.arch, self.expected_widths())

    def to_arch(self) -> Arch:
        """The arch at the final widths."""
        return self.arch.with_widths(self.final_widths())

    def start_epoch(self, epoch: int, epochs: int, cfg: SearchConfig) -> None:
        """Before search epoch `epoch` (0-based) of `epochs`: every mask's per-epoch update (e.g. a temperature)."""
        for m in self.masks.values():
            m.start_epoch(epoch, epochs, cfg)

    def set_drop_path(self, p: float) -> None:
        """Drop-path probability of the body (families without drop path ignore it); reset by `reallocate`."""
        set_drop_path(self.body, p)

    def project(self) -> None:
        """After an architecture step: every mask back into its domain."""
        for m in self.masks.values():
            m.project()

    def next_allocation(self, k_sigma: float, hysteresis: float) -> dict[str, int]:
        """Channels per stage for the next epoch, as the masks ask (dynamic allocation, or fixed)."""
        return {name: m.next_allocation(k_sigma, hysteresis) for name, m in self.masks.items()}

    def records(self) -> dict[str, dict[str, dict]]:
        """{"mu": {stage: ...}, "sigma": {stage: ...}} for the epoch record (see Mask.record)."""
        recs = {name: m.record() for name, m in self.masks.items()}
        return {key: {name: r[key] for name, r in recs.items()} for key in ("mu", "sigma")}

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

    def dense(self, widths: dict[str, int] | None = None, *, known_only: bool = False) -> tuple[Arch, nn.Module]:
        """The plain dense network at the final widths, carrying the supernet's weights (prefix slices).

        `known_only`: the channels past the supernet's allocation are zero (their weights, BatchNorm scales and
        shifts) instead of freshly initialised, so the network computes exactly what the supernet knows of it: the
        allocated channels. What the bake scores candidates with (`capability.SupernetScore`)."""
        arch = self.arch.with_widths(widths or self.final_widths())
        dense = build_network(arch).to(next(self.body.parameters()).device)
        if known_only:
            with torch.no_grad():
                for tensor in dense.state_dict().values():
                    if tensor.is_floating_point():
                        tensor.zero_()
        transplant_state(self.body, dense)
        return arch, dense
