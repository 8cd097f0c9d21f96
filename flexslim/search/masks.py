"""Channel masks of a stage: architecture parameters -> option weights -> per-channel mask, and the mask kinds.

`GaussianMask` (FlexCHarts): one trainable mean `mu` (in channels) per stage. Candidate widths f_k lie on
a grid of `step` channels from `min_width` up to the stage's allocated width (which follows mu + k*sigma,
so the grid covers the Gaussian's reach). alpha_k = exp(-0.5 ((f_k - mu) / sigma)^2), w_k = alpha_k / sum
alpha, and channel c is kept with weight M(c) = sum_{f_k > c} w_k. No Gumbel noise, no temperature.

`GumbelMask` (DMaskingNAS baseline): free logits over a fixed option list, Gumbel-softmax weights.

Every mask is a `Mask`: the small contract the supernet and the search loop use, so neither asks which kind
it holds. The mask factories (`gaussian_masks`, `gumbel_masks`) are what `methods.SEARCH_METHODS` names.
"""

from __future__ import annotations

import abc
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from flexslim.errors import BadInput

if TYPE_CHECKING:
    from flexslim.models.arch import Arch
    from flexslim.recipe.schema import ModelConfig, SearchConfig


class Mask(nn.Module, abc.ABC):
    """One stage's architecture parameters and the channel mask they make (the contract of a mask kind).

    A kind defines the option widths and their weights (`options`, `weights`), the differentiable
    `expected_width` the latency term reads, and the `final_width` the search hands over. The search loop
    drives it through four hooks whose defaults suit a fixed range of options:

        start_epoch(epoch, epochs, cfg)      per-epoch schedule (e.g. a temperature); default: nothing
        project()                            after each architecture step (e.g. clamp); default: nothing
        next_allocation(k_sigma, hysteresis) kernel channels for the next epoch; default: keep `allocated`
        record()                             {"mu": mean_width(), "sigma": float | None} for the epoch record

    `arch_lr(cfg)` picks the kind's Adam learning rate from the recipe's [search] section. The checkpoint
    state is the module's state_dict; `allocated` (channels the kernels hold) is saved by the supernet.

    Example, a mask that always keeps its widest option (what `hard_mask` makes for a dense net)::

        class Widest(Mask):
            def options(self): return torch.tensor([float(self.allocated)])
            def weights(self): return torch.ones(1)
            def expected_width(self): return self.options()[0]
            def final_width(self): return self.allocated
    """

    allocated: int  # channels the stage's kernels hold now

    @staticmethod
    def arch_lr(cfg: SearchConfig) -> float:
        """The Adam learning rate of this kind's architecture parameters (default: search.arch_lr)."""
        return cfg.arch_lr

    def stage_lr(self, cfg: SearchConfig, width: int, widest: int) -> float:
        """This stage's Adam learning rate: `arch_lr` (kinds whose parameters are not in channels ignore the
        stage's `width` among the recipe's `widest`)."""
        return self.arch_lr(cfg)

    @abc.abstractmethod
    def options(self) -> torch.Tensor:
        """Candidate widths f_k (float, increasing, the last one <= allocated)."""

    @abc.abstractmethod
    def weights(self) -> torch.Tensor:
        """Option weights w_k (sum 1), differentiable in the architecture parameters."""

    @abc.abstractmethod
    def expected_width(self) -> torch.Tensor:
        """E[f] as a 0-d tensor, differentiable: what the latency term of the architecture loss reads."""

    @abc.abstractmethod
    def final_width(self) -> int:
        """The width the search hands over for this stage."""

    def mask(self) -> torch.Tensor:
        """M(c) for c = 0 .. allocated-1: the total weight of the options wider than c."""
        f, w = self.options(), self.weights()
        c = torch.arange(self.allocated, dtype=torch.float32, device=w.device)
        return (f[None, :] > c[:, None]).to(w.dtype) @ w

    def start_epoch(self, epoch: int, epochs: int, cfg: SearchConfig) -> None:
        """Called before search epoch `epoch` (0-based) of `epochs`."""

    def project(self) -> None:
        """Called after every architecture (Adam) step: bring the parameters back into their domain."""

    def next_allocation(self, k_sigma: float, hysteresis: float) -> int:
        """Channels the kernels should hold in the next epoch (read at each epoch end)."""
        return self.allocated

    def width_distribution(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(options f_k, weights w_k) the latency term takes its expectation over (deterministic: no noise)."""
        return self.options(), self.weights()

    def mean_width(self) -> float:
        """The centre of the width distribution, channels (default: the expected width)."""
        return float(self.expected_width().detach())

    def record(self) -> dict:
        """What the epoch record shows of this stage: {"mu": mean_width(), "sigma": spread or None}."""
        return {"mu": self.mean_width(), "sigma": None}


class GaussianMask(Mask):
    """FlexCHarts: option weights from a Gaussian over the widths, mean `mu` trained, `sigma` fixed.

    Args:
        mu: initial mean, channels.
        sigma: the Gaussian's standard deviation, channels (a hyperparameter).
        allocated: channels the kernels hold at first (dynamic allocation then follows mu + k sigma).
        min_width: narrowest option and lower bound of mu (after each arch step).
        step: option grid, channels.
        round_to: the final width is mu rounded to a multiple of this.
    """

    def __init__(self, mu: float, sigma: float, allocated: int, min_width: int = 8, step: int = 1, round_to: int = 8):
        super().__init__()
        if sigma <= 0 or step < 1 or min_width < 1:
            raise ValueError(f"need sigma > 0, step >= 1, min_width >= 1 (got {sigma}, {step}, {min_width})")
        self.mu = nn.Parameter(torch.tensor(float(mu)))
        self.sigma, self.step, self.min_width, self.round_to = float(sigma), int(step), int(min_width), int(round_to)
        self.allocated = int(allocated)

    def stage_lr(self, cfg: SearchConfig, width: int, widest: int) -> float:
        """mu is in channels and Adam moves it by about its learning rate per step: with `search.relative_arch_lr`
        a stage's rate is scaled by its width among the recipe's widest, so every stage moves by the same FRACTION
        of its width (in absolute channels a narrow early stage loses half its width while the widest loses a
        quarter, and reaches min_width first)."""
        return cfg.arch_lr * (width / widest if cfg.relative_arch_lr else 1.0)

    def options(self) -> torch.Tensor:
        """Candidate widths f_k: multiples of `step` from min_width to the allocated width (inclusive)."""
        lo = self.step * math.ceil(self.min_width / self.step)
        f = torch.arange(lo, self.allocated + 1, self.step, dtype=torch.float32, device=self.mu.device)
        return f if len(f) else torch.tensor([float(self.allocated)], device=self.mu.device)

    def weights(self) -> torch.Tensor:
        """Normalised option weights w_k of a Gaussian around mu (sigma fixed)."""
        f = self.options()
        return torch.softmax(-0.5 * ((f - self.mu) / self.sigma) ** 2, dim=0)

    def expected_width(self) -> torch.Tensor:
        """E[f] = sum_k w_k f_k (= the sum of the mask), differentiable in mu."""
        return (self.weights() * self.options()).sum()

    def final_width(self) -> int:
        """mu rounded to a multiple of round_to, never below min_width."""
        mu = float(self.mu.detach())
        width = int(round(mu / self.round_to)) * self.round_to
        return max(self.min_width, width)

    def target_allocation(self, k_sigma: float) -> int:
        """Channels the kernels must hold so the Gaussian's reach fits: ceil(mu + k * sigma)."""
        return max(self.final_width(), math.ceil(float(self.mu.detach()) + k_sigma * self.sigma))

    def project(self) -> None:
        """Clamp mu at min_width: options start there, a mean far below it would only slow the way back."""
        with torch.no_grad():
            self.mu.clamp_(min=float(self.min_width))

    def next_allocation(self, k_sigma: float, hysteresis: float) -> int:
        """Grow to ceil(mu + k sigma) at once; shrink to it only when the excess passes hysteresis * sigma."""
        target = self.target_allocation(k_sigma)
        if target > self.allocated or self.allocated - target > hysteresis * self.sigma:
            return target
        return self.allocated

    def mean_width(self) -> float:
        """mu itself (not rounded): what budget-aware rounding starts from."""
        return float(self.mu.detach())

    def record(self) -> dict:
        """What search.jsonl records of this mask: mu and sigma."""
        return {"mu": self.mean_width(), "sigma": self.sigma}

    def extra_repr(self) -> str:
        return f"mu={float(self.mu.detach()):.2f}, sigma={self.sigma:g}, allocated={self.allocated}, step={self.step}"


def hard_mask(width: int, allocated: int, device=None) -> torch.Tensor:
    """1 for the first `width` channels, 0 for the rest: a dense network of that width."""
    m = torch.zeros(allocated, device=device)
    m[:width] = 1.0
    return m


ALPHA_INIT_STD = 1e-3  # DMask logits ~ N(0, ALPHA_INIT_STD^2): DARTS/FBNet's small random init (1e-3 * randn)


def final_temperature(cfg: SearchConfig) -> float:
    """The Gumbel temperature of the last search epoch: search.tau_final (FBNet's 5.0 * 0.956^89 = 0.09 by default)."""
    return float(cfg.tau_final)


def temperature(epoch: int, epochs: int, tau0: float, tau_final: float) -> float:
    """Temperature of search epoch `epoch` (0-based) of `epochs`: tau0 at the first, tau_final at the last,
    geometric in between (FBNet's constant per-epoch decay, stretched to the epoch count)."""
    if epochs <= 1:
        return tau_final
    return tau0 * (tau_final / tau0) ** (min(epoch, epochs - 1) / (epochs - 1))


class GumbelMask(Mask):
    """DMaskingNAS (FBNetV2) baseline: independent logits over a FIXED list of options.

    Training weights are Gumbel-softmax samples at temperature `tau`, annealed geometrically from search.tau0
    at the first epoch to the final temperature at the LAST epoch, whatever the epoch count (`temperature`);
    the kernels always hold the widest option; the final width is the option with the largest logit. The
    logits start random and small (`ALPHA_INIT_STD`, drawn from torch's global generator, which the search
    seeds), as DARTS/FBNet initialise theirs. Its Adam learning rate is search.dmask_lr.

    Args:
        options: increasing positive widths, channels.
        tau: initial Gumbel-softmax temperature.
    """

    def __init__(self, options: list[int], tau: float = 5.0):
        super().__init__()
        if not options or sorted(set(options)) != list(options) or options[0] < 1:
            raise ValueError(f"options must be increasing positive widths, got {options}")
        self.register_buffer("option_widths", torch.tensor(options, dtype=torch.float32), persistent=False)
        self.alpha = nn.Parameter(ALPHA_INIT_STD * torch.randn(len(options)))
        self.tau = float(tau)
        self.allocated = int(options[-1])

    @staticmethod
    def arch_lr(cfg: SearchConfig) -> float:
        """The Adam learning rate of the option logits (search.dmask_lr)."""
        return cfg.dmask_lr

    def options(self) -> torch.Tensor:
        """The fixed candidate widths f_k."""
        return self.option_widths

    def weights(self) -> torch.Tensor:
        """Option weights: Gumbel-softmax samples while training, a tempered softmax in eval mode."""
        if self.training:
            return torch.nn.functional.gumbel_softmax(self.alpha, tau=self.tau, hard=False)
        return torch.softmax(self.alpha / self.tau, dim=0)

    def expected_width(self) -> torch.Tensor:
        """Deterministic (noise-free) expectation used by the latency term: sum softmax(alpha / tau) f."""
        return (torch.softmax(self.alpha / self.tau, dim=0) * self.options()).sum()

    def width_distribution(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The options with the noise-free weights softmax(alpha / tau) (the latency term's expectation)."""
        return self.options(), torch.softmax(self.alpha / self.tau, dim=0)

    def final_width(self) -> int:
        """The most likely option's width (argmax of the logits)."""
        return int(self.options()[int(torch.argmax(self.alpha.detach()))])

    def start_epoch(self, epoch: int, epochs: int, cfg: SearchConfig) -> None:
        """Anneal the temperature: geometric from tau0 (first epoch) to the final temperature (last epoch)."""
        self.tau = temperature(epoch, epochs, cfg.tau0, final_temperature(cfg))

    def extra_repr(self) -> str:
        return f"options={[int(v) for v in self.option_widths]}, tau={self.tau:g}"


def dmask_options(width: int, low: float, high: float, step: int, min_width: int) -> list[int]:
    """The fixed option list of a stage: multiples of `step` from low*width to high*width (>= min_width)."""
    start = max(min_width, step * max(1, round(low * width / step)))
    end = max(start, step * round(high * width / step))
    return list(range(start, end + 1, step))


def gaussian_masks(arch: Arch, model: ModelConfig, search: SearchConfig) -> dict[str, GaussianMask]:
    """FlexCHarts: one GaussianMask per stage, mu at the recipe's width, kernels holding ceil(mu + k sigma)."""
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
