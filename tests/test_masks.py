"""GaussianMask (FlexCHarts) against a direct float64 computation of the paper's formulas."""

import math

import numpy as np
import pytest
import torch
from search_fixtures import single_thread  # noqa: F401

from flexslim.recipe.schema import SearchConfig
from flexslim.search.masks import GaussianMask, GumbelMask, Mask, hard_mask

CASES = [  # mu, sigma, step, allocated, min_width
    (20.0, 4.0, 1, 32, 8),
    (13.3, 2.5, 1, 21, 8),
    (40.7, 6.0, 4, 60, 8),
    (9.0, 4.0, 1, 21, 8),  # the Gaussian runs into min_width
    (30.0, 3.0, 2, 40, 5),  # min_width not on the step grid
    (3.0, 2.0, 1, 12, 1),
]


def oracle(mu, sigma, step, allocated, min_width):
    """f_k, w_k, M(c) for c < allocated, E[f], straight from the definitions, in float64."""
    f = np.array([k * step for k in range(allocated // step + 1) if min_width <= k * step <= allocated], float)
    alpha = np.exp(-0.5 * ((f - mu) / sigma) ** 2)
    w = alpha / alpha.sum()
    m = np.array([w[f > c].sum() for c in range(allocated)])
    return f, w, m, float((w * f).sum())


@pytest.mark.parametrize("mu,sigma,step,allocated,min_width", CASES)
def test_values_match_the_formulas(mu, sigma, step, allocated, min_width):
    gm = GaussianMask(mu, sigma, allocated, min_width=min_width, step=step)
    f, w, m, e = oracle(mu, sigma, step, allocated, min_width)
    with torch.no_grad():
        np.testing.assert_array_equal(gm.options().numpy(), f)
        np.testing.assert_allclose(gm.weights().double().numpy(), w, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(gm.mask().double().numpy(), m, rtol=1e-5, atol=1e-6)
        assert float(gm.expected_width()) == pytest.approx(e, rel=1e-5)
        assert float(gm.weights().sum()) == pytest.approx(1.0, abs=1e-6)
        mask = gm.mask()
    assert mask.shape == (allocated,)
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0 + 1e-6
    assert torch.all(mask[1:] <= mask[:-1] + 1e-7), "M(c) must be non-increasing in c"
    assert torch.all(mask[:min_width] > 1.0 - 1e-6), "channels below min_width are kept by every option"
    # E[f] is the sum of the mask (each option f keeps channels 0..f-1)
    assert float(mask.sum()) == pytest.approx(e, rel=1e-5)


def test_weights_follow_the_gaussian_not_a_temperature():
    # doubling sigma flattens the weights: the spread of the options grows
    narrow, wide = GaussianMask(30, 2, 60), GaussianMask(30, 6, 60)
    with torch.no_grad():

        def var(gm):
            f, w = gm.options(), gm.weights()
            return float((w * f * f).sum() - (w * f).sum() ** 2)

        assert var(wide) > 4 * var(narrow)
    # the weights are deterministic: no Gumbel noise between calls
    assert torch.equal(narrow.weights(), narrow.weights())


@pytest.mark.parametrize("mu,sigma,step,allocated,min_width", CASES)
def test_grad_mu_matches_finite_differences(mu, sigma, step, allocated, min_width):
    """Autograd of a loss through mask() and expected_width() vs a central difference in mu (float32, h = 0.05
    channel: truncation ~ h^2 |f'''| and rounding ~ eps |loss| / h stay below 3e-5 in these cases)."""
    gm = GaussianMask(mu, sigma, allocated, min_width=min_width, step=step)
    v = torch.randn(allocated, generator=torch.Generator().manual_seed(1))

    def loss():
        return (gm.mask() * v).sum() + 0.3 * gm.expected_width()

    (g,) = torch.autograd.grad(loss(), gm.mu)
    h = 0.05
    with torch.no_grad():
        gm.mu += h
        up = float(loss())
        gm.mu -= 2 * h
        down = float(loss())
        gm.mu += h
    fd = (up - down) / (2 * h)
    assert float(g) == pytest.approx(fd, rel=5e-4, abs=1e-4)


@pytest.mark.parametrize("mu,sigma,step,allocated,min_width", CASES)
def test_grad_of_expected_width_is_the_variance_over_sigma_squared(mu, sigma, step, allocated, min_width):
    """d E[f] / d mu = Var_w[f] / sigma^2 exactly (differentiate w_k = softmax(-(f_k - mu)^2 / 2 sigma^2))."""
    gm = GaussianMask(mu, sigma, allocated, min_width=min_width, step=step)
    (g,) = torch.autograd.grad(gm.expected_width(), gm.mu)
    f, w, _, e = oracle(mu, sigma, step, allocated, min_width)
    expected = float((w * (f - e) ** 2).sum()) / sigma**2
    assert float(g) == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert float(g) >= 0


def test_expected_width_tracks_mu():
    sigma, allocated = 4.0, 120
    mus = np.arange(24.0, 96.0, 0.5)  # more than 3 sigma from min_width (8) and from the allocated edge
    widths = []
    for mu in mus:
        gm = GaussianMask(float(mu), sigma, allocated)
        widths.append(float(gm.expected_width().detach()))
    widths = np.array(widths)
    assert np.all(np.diff(widths) > 0), "E[f] must grow with mu"
    assert np.max(np.abs(widths - mus)) < 1.0, "E[f] must stay within a channel of mu away from the edges"


def test_expected_width_is_monotone_near_the_edges_too():
    ws = [float(GaussianMask(mu, 4.0, 40).expected_width().detach()) for mu in np.arange(-5.0, 50.0, 1.0)]
    assert np.all(np.diff(ws) >= -1e-5)
    assert 8.0 - 1e-5 <= min(ws) and max(ws) <= 40.0 + 1e-5  # E[f] stays within the options


@pytest.mark.parametrize(
    "mu,round_to,min_width,expected",
    [
        (37.0, 8, 8, 40),
        (35.0, 8, 8, 32),
        (33.9, 8, 8, 32),
        (44.1, 8, 8, 48),
        (61.0, 4, 8, 60),
        (63.0, 4, 8, 64),
        (3.0, 8, 8, 8),
        (-20.0, 8, 8, 8),
        (11.0, 8, 12, 12),
        (17.0, 1, 8, 17),
    ],
)
def test_final_width_rounds_to_round_to_and_respects_min_width(mu, round_to, min_width, expected):
    gm = GaussianMask(mu, 4.0, 64, min_width=min_width, round_to=round_to)
    assert gm.final_width() == expected
    assert isinstance(gm.final_width(), int)


def test_final_width_is_the_nearest_multiple():
    for mu in np.arange(8.1, 100.0, 0.7):
        fw = GaussianMask(float(mu), 4.0, 128).final_width()
        assert fw % 8 == 0 and abs(fw - mu) <= 4.0 + 1e-6


@pytest.mark.parametrize("mu,sigma,k", [(20.0, 4.0, 3.0), (20.3, 4.0, 3.0), (33.5, 2.5, 2.0), (64.0, 8.0, 3.0)])
def test_target_allocation_is_ceil_mu_plus_k_sigma(mu, sigma, k):
    gm = GaussianMask(mu, sigma, 10)
    assert gm.target_allocation(k) == math.ceil(mu + k * sigma)


def test_target_allocation_never_below_final_width():
    gm = GaussianMask(-30.0, 4.0, 10, min_width=8)
    assert gm.target_allocation(3.0) >= gm.final_width() == 8


def test_mu_is_the_only_parameter_and_invalid_settings_fail():
    gm = GaussianMask(20, 4, 32)
    assert [n for n, _ in gm.named_parameters()] == ["mu"]
    for bad in ({"sigma": 0.0}, {"sigma": -1.0}, {"step": 0}, {"min_width": 0}):
        kwargs = {"mu": 20, "sigma": 4.0, "allocated": 32, **bad}
        with pytest.raises(ValueError):
            GaussianMask(**kwargs)


def test_allocated_can_grow_past_anything_initial():
    gm = GaussianMask(20, 4, 32)
    gm.allocated = 500
    assert gm.mask().shape == (500,) and float(gm.options().max()) == 500


def test_hard_mask():
    m = hard_mask(5, 9)
    assert m.tolist() == [1.0] * 5 + [0.0] * 4


# -- the Mask contract the search loop drives ---------------------------------------------------------------
def test_gaussian_hooks_clamp_grow_and_record():
    m = GaussianMask(20.0, 2.0, 26, min_width=8, round_to=4)
    assert isinstance(m, Mask) and m.arch_lr(SearchConfig(arch_lr=0.3, dmask_lr=0.7)) == 0.3
    m.start_epoch(3, 10, SearchConfig())  # nothing to anneal
    assert m.record() == {"mu": 20.0, "sigma": 2.0} and m.mean_width() == 20.0
    with torch.no_grad():
        m.mu.fill_(-3.0)
    m.project()
    assert float(m.mu.detach()) == 8.0  # clamped at min_width
    assert m.next_allocation(3.0, 0.5) == m.target_allocation(3.0) == 14  # 26 - 14 > 0.5 sigma: shrinks


def test_gumbel_hooks_anneal_and_keep_the_fixed_range():
    m = GumbelMask([4, 8, 12, 16], tau=5.0)
    assert isinstance(m, Mask) and m.arch_lr(SearchConfig(arch_lr=0.3, dmask_lr=0.7)) == 0.7
    m.start_epoch(9, 10, SearchConfig(tau0=5.0))
    assert m.tau == pytest.approx(SearchConfig().tau_final)  # FBNet's final temperature at the last epoch
    m.start_epoch(0, 10, SearchConfig(tau0=5.0))
    assert m.tau == pytest.approx(5.0)
    alpha = m.alpha.detach().clone()
    m.project()
    assert torch.equal(m.alpha.detach(), alpha)
    assert m.next_allocation(3.0, 0.5) == 16
    assert m.record() == {"mu": pytest.approx(10.0, abs=0.05), "sigma": None}  # ~uniform logits (1e-3 randn)
