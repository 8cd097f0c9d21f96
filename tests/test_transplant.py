"""Dynamic channel allocation: rebuilding the supernet at new widths keeps what overlaps bit-exact (weights,
BN statistics, SGD momentum) and changes the function only by the ~0 mask mass of the new channels."""

import pytest
import torch
import torch.nn.functional as F
from search_fixtures import inputs, make_supernet, single_thread  # noqa: F401

from flexslim.models.transplant import copy_overlap, transplant_optimizer, transplant_state
from flexslim.train.loop import make_sgd

# Growing the allocation past ceil(mu + 3 sigma) adds channels whose mask is the Gaussian's tail beyond
# 3 sigma (~5e-4 on a 1-channel grid) and renormalises the weights by as much, so the output may move by a
# few 1e-4 of its scale; without the transplant it would move by ~100%.
REALLOC_REL_TOL = 5e-3


def overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[slice, ...]:
    return tuple(slice(0, min(x, y)) for x, y in zip(a.shape, b.shape))


def assert_overlap_bit_exact(old_state: dict, new_state: dict):
    assert set(old_state) == set(new_state)
    for name, old in old_state.items():
        new = new_state[name]
        assert old.dim() == new.dim(), name
        region = overlap(old, new)
        assert torch.equal(new[region], old[region]), f"{name} changed on the overlap"


def grown(sn, by: int) -> dict[str, int]:
    return {k: v + by for k, v in sn.allocated().items()}


def relative_change(y0: torch.Tensor, y1: torch.Tensor) -> float:
    return float((y1 - y0).abs().max()) / float(y0.abs().max())


def _train_a_little(sn, steps: int = 3, lr: float = 0.05):
    """A few SGD steps with momentum and soft masks, so weights, BN statistics and momentum are all non-trivial."""
    opt = make_sgd(sn.weight_parameters(), lr, 0.9, 3e-4)
    sn.train()
    for i in range(steps):
        x = inputs(sn, 8, seed=100 + i)
        y = torch.arange(8) % sn.arch.num_classes
        loss = F.cross_entropy(sn(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("by", [1, 8, 40])
def test_growing_keeps_every_overlapping_weight_and_bn_buffer(by):
    sn = make_supernet()
    _train_a_little(sn)
    old_state = {k: v.clone() for k, v in sn.body.state_dict().items()}
    mus = {k: float(m.mu.detach()) for k, m in sn.masks.items()}
    old_body = sn.reallocate(grown(sn, by))
    assert old_body is not sn.body
    assert sn.allocated() == {k: v + by for k, v in {"a": 14, "b": 22, "c": 30}.items()}
    assert {k: float(m.mu.detach()) for k, m in sn.masks.items()} == mus
    new_state = sn.body.state_dict()
    assert_overlap_bit_exact(old_state, new_state)
    assert any(new_state[k].shape != old_state[k].shape for k in old_state)
    # new channels start from the layers' normal init: BN at identity, conv kernels random (not zero)
    bn = sn.body.stages[1][0].conv1[1]
    n_old = 22
    assert torch.equal(bn.weight[n_old:], torch.ones(by)) and torch.equal(bn.bias[n_old:], torch.zeros(by))
    assert torch.equal(bn.running_mean[n_old:], torch.zeros(by)) and torch.equal(bn.running_var[n_old:], torch.ones(by))
    conv = sn.body.stages[1][0].conv1[0].weight.detach()
    assert float(conv[n_old:].abs().sum()) > 0 and float(conv[:, 14:].abs().sum()) > 0


@pytest.mark.parametrize("by", [1, 8, 40])
def test_growing_barely_changes_the_supernet_function(by):
    sn = make_supernet()
    _train_a_little(sn)
    sn.eval()
    x = inputs(sn, 16, seed=7)
    with torch.no_grad():
        y0 = sn(x)
        sn.reallocate(grown(sn, by))
        sn.eval()
        y1 = sn(x)
        tail = max(float(m.mask()[m.allocated - by :].max()) for m in sn.masks.values())
    assert tail < 2e-3, "the new channels should sit beyond mu + 3 sigma, where the mask is ~0"
    change = relative_change(y0, y1)
    assert change < REALLOC_REL_TOL, f"re-allocation moved the output by {change:.2e} of its scale"


def test_a_rebuild_without_transplant_would_fail_the_tolerance():
    """The tolerance is meaningful: a fresh body at the same widths changes the output by far more."""
    sn = make_supernet().eval()
    x = inputs(sn, 16, seed=7)
    with torch.no_grad():
        y0 = sn(x)
        torch.manual_seed(123)
        sn.body = sn._build(sn.allocated()).eval()
        y1 = sn(x)
    assert relative_change(y0, y1) > 100 * REALLOC_REL_TOL


def test_shrinking_keeps_the_overlap_and_a_round_trip_restores_the_function():
    sn = make_supernet()
    _train_a_little(sn)
    sn.eval()
    x = inputs(sn, 16, seed=8)
    original = sn.allocated()
    with torch.no_grad():
        y0 = sn(x)
    before = {k: v.clone() for k, v in sn.body.state_dict().items()}
    sn.reallocate(grown(sn, 10))
    sn.reallocate(original)  # shrink back: the extra channels are dropped, everything else is as it was
    after = sn.body.state_dict()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    sn.eval()
    with torch.no_grad():
        assert torch.equal(sn(x), y0)


def test_shrinking_below_the_allocation_keeps_the_prefix():
    sn = make_supernet()
    _train_a_little(sn)
    old_state = {k: v.clone() for k, v in sn.body.state_dict().items()}
    sn.reallocate({"a": 9, "b": 17, "c": 25})
    assert sn.allocated() == {"a": 9, "b": 17, "c": 25}
    new_state = sn.body.state_dict()
    assert_overlap_bit_exact(old_state, new_state)
    assert sn.body.stages[2][0].conv2[0].weight.shape == (25, 25, 3, 3)
    assert sn(inputs(sn)).shape == (6, 10)


def test_reallocate_keeps_train_or_eval_mode():
    sn = make_supernet()
    sn.train()
    sn.reallocate(grown(sn, 2))
    assert sn.body.training
    sn.eval()
    sn.reallocate(grown(sn, 2))
    assert not sn.body.training


@pytest.mark.parametrize("by", [6, -3])
def test_transplant_optimizer_keeps_momentum_bit_exact_and_zero_outside(by):
    sn = make_supernet()
    opt = _train_a_little(sn)
    old_names = dict(sn.body.named_parameters())
    old_momentum = {n: opt.state[p]["momentum_buffer"].clone() for n, p in old_names.items()}
    old_body = sn.reallocate(grown(sn, by))
    new_opt = make_sgd(sn.weight_parameters(), 0.05, 0.9, 3e-4)
    n = transplant_optimizer(opt, old_body, new_opt, sn.body)
    assert n == len(old_names)
    for name, p in sn.body.named_parameters():
        buf = new_opt.state[p]["momentum_buffer"]
        assert buf.shape == p.shape
        region = overlap(buf, old_momentum[name])
        assert torch.equal(buf[region], old_momentum[name][region]), name
        outside = torch.ones_like(buf, dtype=torch.bool)
        outside[region] = False
        assert torch.count_nonzero(buf[outside]) == 0, f"{name}: momentum of new channels must start at zero"
    # the new optimizer steps with the carried momentum (no shape errors, parameters move)
    before = [p.detach().clone() for p in sn.weight_parameters()]
    sn.train()
    loss = F.cross_entropy(sn(inputs(sn, 8)), torch.arange(8))
    new_opt.zero_grad()
    loss.backward()
    new_opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, sn.weight_parameters()))


def test_transplant_optimizer_matches_by_name_and_skips_params_without_state():
    sn = make_supernet()
    opt = make_sgd(sn.weight_parameters(), 0.05, 0.9, 0.0)  # never stepped: no state yet
    old_body = sn.reallocate(grown(sn, 2))
    new_opt = make_sgd(sn.weight_parameters(), 0.05, 0.9, 0.0)
    assert transplant_optimizer(opt, old_body, new_opt, sn.body) == 0
    assert len(new_opt.state) == 0


def test_copy_overlap_and_transplant_state_basics():
    dst, src = torch.zeros(3, 5), torch.arange(8.0).view(2, 4)
    copy_overlap(dst, src)
    assert torch.equal(dst[:2, :4], src) and torch.count_nonzero(dst[2:]) == 0 and torch.count_nonzero(dst[:, 4:]) == 0
    scalar = torch.tensor(0)
    copy_overlap(scalar, torch.tensor(7))
    assert int(scalar) == 7
    with pytest.raises(ValueError):
        copy_overlap(torch.zeros(2, 2), torch.zeros(2))
    a, b = make_supernet(seed=0), make_supernet(seed=1)
    assert transplant_state(a.body, b.body) == len(b.body.state_dict())
    for k, v in a.body.state_dict().items():
        assert torch.equal(v, b.body.state_dict()[k])
