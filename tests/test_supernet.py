"""Supernet: the hard-masked supernet IS the baked dense network; parameters split into arch vs weights."""

import math

import pytest
import torch
from search_fixtures import SMALL_MODEL, SMALL_SEARCH, inputs, make_supernet, replace, single_thread, small_arch  # noqa: F401

from flexslim.models.families import build_network, cost_terms
from flexslim.search.masks import GaussianMask, gaussian_masks
from flexslim.search.supernet import MaskPoint, Supernet


def test_gaussian_masks_start_at_the_recipe_widths():
    arch = small_arch()
    masks = gaussian_masks(arch, SMALL_MODEL, SMALL_SEARCH)
    assert list(masks) == ["a", "b", "c"]
    for spec in arch.stages:
        m = masks[spec.name]
        assert isinstance(m, GaussianMask)
        assert float(m.mu.detach()) == spec.width and m.sigma == SMALL_SEARCH.sigma
        assert m.allocated == math.ceil(spec.width + SMALL_SEARCH.k_sigma * SMALL_SEARCH.sigma)
        assert (m.min_width, m.round_to, m.step) == (SMALL_MODEL.min_width, SMALL_MODEL.round_to, SMALL_SEARCH.step)


def test_body_is_built_at_the_allocated_widths_with_a_mask_point_per_unit():
    sn = make_supernet()
    alloc = sn.allocated()
    assert alloc == {"a": 14, "b": 22, "c": 30}
    for spec, stage in zip(sn.arch.stages, sn.body.stages):
        for block in stage:
            for unit in (block.conv1, block.conv2, block.shortcut):
                if unit is None:
                    continue
                assert unit[0].out_channels == alloc[spec.name]
                assert isinstance(unit[-1], MaskPoint) and unit[-1].stage == spec.name
    # the stem is fixed, not searched: no mask point there
    assert not any(isinstance(m, MaskPoint) for m in sn.body.stem.modules())


def test_arch_and_weight_parameters_are_disjoint_and_cover_everything():
    sn = make_supernet()
    arch_ids = {id(p) for p in sn.arch_parameters()}
    weight_ids = {id(p) for p in sn.weight_parameters()}
    all_ids = {id(p) for p in sn.parameters()}
    assert arch_ids and weight_ids
    assert not arch_ids & weight_ids
    assert arch_ids | weight_ids == all_ids
    assert arch_ids == {id(m.mu) for m in sn.masks.values()}
    # still true after re-allocation (the body is swapped, the mus are kept)
    mus = [m.mu for m in sn.masks.values()]
    sn.reallocate({"a": 20, "b": 30, "c": 40})
    assert [id(p) for p in sn.arch_parameters()] == [id(p) for p in mus]
    assert {id(p) for p in sn.arch_parameters()} | {id(p) for p in sn.weight_parameters()} == {
        id(p) for p in sn.parameters()
    }
    assert not {id(p) for p in sn.arch_parameters()} & {id(p) for p in sn.weight_parameters()}


def test_masks_are_applied_where_the_stage_channels_are_produced():
    """Soft masks: a stage unit's output is its BN output times the stage's mask, channel by channel."""
    sn = make_supernet().eval()
    unit = sn.body.stages[1][0].conv1
    seen = {}
    unit[1].register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.detach().clone()))
    unit.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.detach().clone()))
    with torch.no_grad():
        sn(inputs(sn))
        mask = sn.masks["b"].mask()
    torch.testing.assert_close(seen["out"], seen["bn"] * mask.view(1, -1, 1, 1), rtol=0, atol=0)


def test_expected_widths_and_cost_terms_are_differentiable_in_mu():
    sn = make_supernet()
    ew = sn.expected_widths()
    assert set(ew) == {"a", "b", "c"}
    for name, m in sn.masks.items():
        assert float(ew[name].detach()) == pytest.approx(float(m.mu.detach()), abs=0.5)
    terms = sn.expected_cost_terms()
    plain = cost_terms(sn.arch, {k: float(v.detach()) for k, v in ew.items()})
    assert {k: float(torch.as_tensor(v).detach()) for k, v in terms.items()} == pytest.approx(
        {k: float(v) for k, v in plain.items()}
    )
    total = sum(v for v in terms.values() if torch.is_tensor(v))
    grads = torch.autograd.grad(total, sn.arch_parameters())
    assert all(float(g) > 0 for g in grads)  # more channels, more MACs


def test_to_arch_and_final_widths():
    sn = make_supernet()
    with torch.no_grad():
        sn.masks["a"].mu.fill_(13.0)
        sn.masks["b"].mu.fill_(2.0)  # below min_width
        sn.masks["c"].mu.fill_(29.5)
    assert sn.final_widths() == {"a": 12, "b": 4, "c": 28}
    arch = sn.to_arch()
    assert arch.widths == {"a": 12, "b": 4, "c": 28}
    assert replace(arch, stages=sn.arch.stages) == sn.arch  # only the widths change


def _hard_vs_baked(sn: Supernet, widths=None, n: int = 6) -> float:
    x = inputs(sn, n, seed=5)
    sn.eval()
    with torch.no_grad(), sn.hard(widths):
        y_sn = sn(x)
    arch, dense = sn.dense(widths)
    assert arch.widths == (widths or sn.final_widths())
    dense.eval()
    with torch.no_grad():
        y_dense = dense(x)
    scale = float(y_dense.abs().max())
    assert scale > 1e-3  # a non-trivial output, so a zero difference means something
    return float((y_sn - y_dense).abs().max())


@pytest.mark.parametrize("head_width", [0, 12])
def test_baked_dense_net_equals_hard_masked_supernet(head_width):
    sn = make_supernet(head_width)
    assert _hard_vs_baked(sn) < 1e-5


def test_baked_equals_hard_after_train_mode_passes_changed_bn_statistics():
    sn = make_supernet(seed=3)
    before = {k: v.clone() for k, v in sn.body.state_dict().items() if "running_mean" in k}
    sn.train()
    with torch.no_grad():
        for i in range(3):
            sn(inputs(sn, 8, seed=10 + i) * 2.0)  # soft masks: every allocated channel sees data
    after = {k: v for k, v in sn.body.state_dict().items() if "running_mean" in k}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert _hard_vs_baked(sn) < 1e-5


@pytest.mark.parametrize(
    "widths",
    [
        {"a": 5, "b": 11, "c": 13},  # not multiples of round_to
        {"a": 14, "b": 22, "c": 30},  # the whole allocation
        {"a": 4, "b": 4, "c": 4},
        {"a": 1, "b": 20, "c": 7},
    ],
)
def test_baked_equals_hard_at_non_default_widths(widths):
    sn = make_supernet(head_width=6, seed=1, input_shape=(3, 15, 13))  # odd sizes: strides round up
    sn.train()
    with torch.no_grad():
        sn(inputs(sn, 4, seed=2))
    assert _hard_vs_baked(sn, widths) < 1e-5


def test_baked_equals_hard_in_train_mode_too():
    """BatchNorm normalises each channel on its own, so with batch statistics the kept channels agree as well."""
    sn = make_supernet(seed=2)
    widths = {"a": 8, "b": 12, "c": 20}
    _, dense = sn.dense(widths)
    sn.train(), dense.train()
    x = inputs(sn, 8, seed=9)
    with torch.no_grad(), sn.hard(widths):
        y_sn = sn(x)
    with torch.no_grad():
        y_dense = dense(x)
    assert float((y_sn - y_dense).abs().max()) < 1e-4


def test_hard_mask_differs_from_soft_and_is_released():
    sn = make_supernet().eval()
    x = inputs(sn)
    with torch.no_grad():
        soft = sn(x)
        with sn.hard({"a": 4, "b": 4, "c": 4}):
            hard = sn(x)
        again = sn(x)
    assert float((soft - hard).abs().max()) > 1e-3
    assert torch.equal(soft, again)


def test_bake_builds_a_plain_network_without_masks():
    sn = make_supernet()
    arch, dense = sn.dense()
    assert not any(isinstance(m, MaskPoint) for m in dense.modules())
    assert type(dense) is type(build_network(arch))
    assert {k: v.shape for k, v in dense.state_dict().items()} == {
        k: v.shape for k, v in build_network(arch).state_dict().items()
    }
