"""DMaskingNAS baseline: GumbelMask over a fixed range, temperature annealing to FBNet's final temperature at the
last epoch, small random (seeded) logits, argmax final width."""

from __future__ import annotations

import pytest
import torch
from search_fixtures import SMALL_MODEL, hand_latency_model, single_thread, small_arch  # noqa: F401

from flexslim.recipe.schema import SearchConfig
from flexslim.search.masks import GumbelMask, dmask_options, final_temperature, gumbel_masks, temperature
from flexslim.search.supernet import Supernet, make_masks


def test_options_cover_the_range_on_the_step_grid():
    assert dmask_options(32, 0.25, 3.0, 4, 4) == list(range(8, 97, 4))
    assert dmask_options(32, 0.75, 1.5, 4, 4) == list(range(24, 49, 4))
    assert dmask_options(8, 0.1, 0.2, 4, 4) == [4]  # never below min_width, never empty


def test_weights_sum_to_one_and_mask_is_the_tail_sum():
    torch.manual_seed(0)
    m = GumbelMask([4, 8, 12, 16], tau=2.0)
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([0.3, -1.0, 2.0, 0.1]))
    m.train()
    w = m.weights()
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    m.eval()
    w = m.weights()
    assert torch.allclose(w, torch.softmax(m.alpha / 2.0, 0))
    expected = torch.tensor([sum(float(w[k]) for k, f in enumerate([4, 8, 12, 16]) if f > c) for c in range(16)])
    assert torch.allclose(m.mask(), expected, atol=1e-6)
    assert m.allocated == 16


def test_gumbel_samples_are_noisy_in_training_and_alpha_gets_gradients():
    m = GumbelMask([4, 8, 12, 16], tau=1.0)
    m.train()
    torch.manual_seed(0)
    a, b = m.weights(), m.weights()
    assert not torch.allclose(a, b)
    (m.mask() * torch.arange(16.0)).sum().backward()
    assert m.alpha.grad is not None and m.alpha.grad.abs().sum() > 0


def test_logits_start_small_random_and_seeded():
    torch.manual_seed(3)
    a = GumbelMask(list(range(8, 97, 4))).alpha.detach().clone()
    torch.manual_seed(3)
    b = GumbelMask(list(range(8, 97, 4))).alpha.detach().clone()
    assert torch.equal(a, b)  # the search seeds torch before building the masks: reproducible
    assert a.abs().max() < 0.01 and a.std() > 0  # random, not zero, and small (DARTS/FBNet: 1e-3 * randn)


@pytest.mark.parametrize("epochs", [1, 3, 10, 50, 90])
def test_temperature_reaches_the_final_one_at_the_last_epoch_whatever_the_epoch_count(epochs):
    taus = [temperature(e, epochs, 5.0, 0.09) for e in range(epochs)]
    assert taus[-1] == pytest.approx(0.09)
    if epochs > 1:
        assert taus[0] == pytest.approx(5.0)
        assert all(a > b for a, b in zip(taus, taus[1:]))  # geometric: a constant ratio per epoch
        ratios = [b / a for a, b in zip(taus, taus[1:])]
        assert max(ratios) == pytest.approx(min(ratios))


def test_default_final_temperature_is_fbnets():
    cfg = SearchConfig()
    assert final_temperature(cfg) == pytest.approx(getattr(cfg, "tau_final", 5.0 * 0.956**89), rel=1e-6)
    assert 0.05 < final_temperature(cfg) < 0.15  # 5.0 x 0.956^89 over FBNet's 90 epochs


def test_final_width_is_the_argmax_option():
    m = GumbelMask([4, 8, 12, 16])
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([0.0, 0.0, 3.0, 1.0]))
    assert m.final_width() == 12


def test_temperature_anneals_per_epoch_in_the_search():
    from flexslim.data.tensors import Dataset
    from flexslim.latency.budget import Budget
    from flexslim.recipe.schema import Recipe
    from flexslim.search.loop import run_search

    arch = small_arch()
    g = torch.Generator().manual_seed(0)
    ds = Dataset(
        "quickstart",
        torch.rand(128, 1, 16, 16, generator=g),
        torch.randint(0, 10, (128,), generator=g),
        torch.rand(16, 1, 16, 16, generator=g),
        torch.randint(0, 10, (16,), generator=g),
        10,
        (0.3,),
        (0.35,),
    )
    search = SearchConfig(method="dmask", epochs=3, batch_size=32, tau0=5.0, dmask_range="small")
    recipe = Recipe(model=SMALL_MODEL, search=search)
    lat = hand_latency_model(arch)
    st = run_search(arch, recipe, ds, budget=Budget(1.0), latency=lat, device=torch.device("cpu"))
    taus = {m.tau for m in st.supernet.masks.values()}
    assert len(taus) == 1 and taus.pop() == pytest.approx(final_temperature(search))  # the last epoch: final tau
    # fixed range: allocation never moves, and final widths are options of the range
    for m in st.supernet.masks.values():
        assert m.allocated == m.options()[-1]
        assert m.final_width() in [int(v) for v in m.options()]
    assert all(h["allocated"] == h["allocated_before"] for h in st.history)


def test_make_masks_picks_the_method_and_rejects_unknown():
    from flexslim.errors import BadInput

    arch = small_arch()
    assert all(isinstance(m, GumbelMask) for m in make_masks(arch, SMALL_MODEL, SearchConfig(method="dmask")).values())
    small = gumbel_masks(arch, SMALL_MODEL, SearchConfig(dmask_range="small"))
    large = gumbel_masks(arch, SMALL_MODEL, SearchConfig(dmask_range="large"))
    for name in small:
        assert small[name].allocated < large[name].allocated
    with pytest.raises(BadInput):
        make_masks(arch, SMALL_MODEL, SearchConfig(method="nope"))
    sn = Supernet(arch, large)
    assert sn.allocated() == {n: m.allocated for n, m in large.items()}
