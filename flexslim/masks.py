"""Channel masks of a stage: architecture parameters -> option weights -> per-channel mask.

`GaussianMask` (FlexCHarts): one trainable mean `mu` (in channels) per stage. Candidate widths f_k lie on
a grid of `step` channels from `min_width` up to the stage's allocated width (which follows mu + k*sigma,
so the grid covers the Gaussian's reach). alpha_k = exp(-0.5 ((f_k - mu) / sigma)^2), w_k = alpha_k / sum
alpha, and channel c is kept with weight M(c) = sum_{f_k > c} w_k. No Gumbel noise, no temperature.

Every mask exposes the same small interface, used by the supernet and the search loop:
`mask()` (a vector over the allocated channels), `expected_width()`, `final_width()`, `allocated`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GaussianMask(nn.Module):
    def __init__(self, mu: float, sigma: float, allocated: int, min_width: int = 8, step: int = 1, round_to: int = 8):
        super().__init__()
        if sigma <= 0 or step < 1 or min_width < 1:
            raise ValueError(f"need sigma > 0, step >= 1, min_width >= 1 (got {sigma}, {step}, {min_width})")
        self.mu = nn.Parameter(torch.tensor(float(mu)))
        self.sigma, self.step, self.min_width, self.round_to = float(sigma), int(step), int(min_width), int(round_to)
        self.allocated = int(allocated)

    def options(self) -> torch.Tensor:
        """Candidate widths f_k: multiples of `step` from min_width to the allocated width (inclusive)."""
        lo = self.step * math.ceil(self.min_width / self.step)
        f = torch.arange(lo, self.allocated + 1, self.step, dtype=torch.float32, device=self.mu.device)
        return f if len(f) else torch.tensor([float(self.allocated)], device=self.mu.device)

    def weights(self) -> torch.Tensor:
        f = self.options()
        return torch.softmax(-0.5 * ((f - self.mu) / self.sigma) ** 2, dim=0)

    def mask(self) -> torch.Tensor:
        """M(c) for c = 0 .. allocated-1: the total weight of the options wider than c."""
        f, w = self.options(), self.weights()
        c = torch.arange(self.allocated, dtype=torch.float32, device=w.device)
        return (f[None, :] > c[:, None]).to(w.dtype) @ w

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

    def extra_repr(self) -> str:
        return f"mu={float(self.mu):.2f}, sigma={self.sigma:g}, allocated={self.allocated}, step={self.step}"


def hard_mask(width: int, allocated: int, device=None) -> torch.Tensor:
    """1 for the first `width` channels, 0 for the rest: a dense network of that width."""
    m = torch.zeros(allocated, device=device)
    m[:width] = 1.0
    return m


class GumbelMask(nn.Module):
    """DMaskingNAS (FBNetV2) baseline: independent logits over a FIXED list of options.

    Training weights are Gumbel-softmax samples at temperature `tau` (annealed by the search loop);
    the kernels always hold the widest option; the final width is the option with the largest logit.
    """

    def __init__(self, options: list[int], tau: float = 5.0):
        super().__init__()
        if not options or sorted(set(options)) != list(options) or options[0] < 1:
            raise ValueError(f"options must be increasing positive widths, got {options}")
        self.register_buffer("option_widths", torch.tensor(options, dtype=torch.float32), persistent=False)
        self.alpha = nn.Parameter(torch.zeros(len(options)))
        self.tau = float(tau)
        self.allocated = int(options[-1])

    def options(self) -> torch.Tensor:
        return self.option_widths

    def weights(self) -> torch.Tensor:
        if self.training:
            return torch.nn.functional.gumbel_softmax(self.alpha, tau=self.tau, hard=False)
        return torch.softmax(self.alpha / self.tau, dim=0)

    def mask(self) -> torch.Tensor:
        f, w = self.options(), self.weights()
        c = torch.arange(self.allocated, dtype=torch.float32, device=w.device)
        return (f[None, :] > c[:, None]).to(w.dtype) @ w

    def expected_width(self) -> torch.Tensor:
        """Deterministic (noise-free) expectation used by the latency term: sum softmax(alpha / tau) f."""
        return (torch.softmax(self.alpha / self.tau, dim=0) * self.options()).sum()

    def final_width(self) -> int:
        return int(self.options()[int(torch.argmax(self.alpha.detach()))])

    def extra_repr(self) -> str:
        return f"options={[int(v) for v in self.option_widths]}, tau={self.tau:g}"


def dmask_options(width: int, low: float, high: float, step: int, min_width: int) -> list[int]:
    """The fixed option list of a stage: multiples of `step` from low*width to high*width (>= min_width)."""
    start = max(min_width, step * max(1, round(low * width / step)))
    end = max(start, step * round(high * width / step))
    return list(range(start, end + 1, step))
