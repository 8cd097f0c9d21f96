"""The DARTS-cell family: structure, analytic costs, and the oracles with the two-input coupling
(a stage's 4C-channel output feeds the next TWO cells, as concatenated blocks)."""

from __future__ import annotations

import pytest
import torch
from search_fixtures import randomize_batchnorm, single_thread  # noqa: F401 (autouse fixture)
from torch.utils.flop_counter import FlopCounterMode

from flexslim.models.arch import Arch
from flexslim.models.families import build_network, cost_terms
from flexslim.models.spaces.darts import ChunkedConv2d, DartsNet
from flexslim.models.transplant import transplant_optimizer
from flexslim.recipe.schema import ModelConfig, SearchConfig, StageSpec
from flexslim.search.masks import gaussian_masks
from flexslim.search.supernet import Supernet

STAGES = tuple(StageSpec(f"c{i}", 6 + 2 * i, 1, 2 if i in (2, 4) else 1) for i in range(6))


def darts_arch(head_width: int = 24, stages=STAGES) -> Arch:
    return Arch(
        family="darts",
        stages=stages,
        input_shape=(3, 16, 16),
        num_classes=10,
        dataset="quickstart",
        mean=(0.3,) * 3,
        std=(0.35,) * 3,
        stem_width=12,
        head_width=head_width,
    )


def supernet(seed: int = 0) -> Supernet:
    arch = darts_arch()
    torch.manual_seed(seed)
    sn = Supernet(arch, gaussian_masks(arch, ModelConfig(min_width=2, round_to=2), SearchConfig(sigma=1.5)))
    return randomize_batchnorm(sn, seed)


def x_batch(n=4, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_builds_the_asked_widths_with_reductions_and_two_input_cells():
    arch = darts_arch()
    widths = {s.name: 4 + 3 * i for i, s in enumerate(arch.stages)}
    net = build_network(arch, widths).eval()
    assert isinstance(net, DartsNet)
    assert [c.reduction for c in net.cells] == [s.stride == 2 for s in arch.stages]
    for i, (cell, spec) in enumerate(zip(net.cells, arch.stages)):
        c = widths[spec.name]
        pre0, pre1 = cell.preprocess0[1], cell.preprocess1[1]
        assert pre0.out_channels == pre1.out_channels == c
        # preprocess1 reads the previous cell (4 blocks of its width), preprocess0 the one before
        prev = 4 * widths[arch.stages[i - 1].name] if i >= 1 else arch.stem_width
        prev2 = 4 * widths[arch.stages[i - 2].name] if i >= 2 else arch.stem_width
        assert (pre1.in_channels, pre0.in_channels) == (prev, prev2)
        assert pre1.in_chunks == (4 if i >= 1 else 1) and pre0.in_chunks == (4 if i >= 2 else 1)
    assert net(x_batch()).shape == (4, 10)


@pytest.mark.parametrize("head_width", [0, 24])
def test_cost_terms_match_the_flop_counter(head_width):
    arch = darts_arch(head_width)
    for widths in ({s.name: s.width for s in arch.stages}, {s.name: 3 + 5 * i for i, s in enumerate(arch.stages)}):
        net = build_network(arch, widths).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(torch.rand(1, 3, 16, 16))
        stem = 9 * 3 * arch.stem_width * 16 * 16
        fixed_head = head_width * arch.num_classes if head_width else 0  # the linear after the 1x1 head
        macs = sum(v for k, v in cost_terms(arch, widths).items() if k.startswith("macs")) * 1e6
        assert macs + stem + fixed_head == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)


def test_cost_terms_see_the_coupling_to_the_next_two_stages():
    arch = darts_arch()
    w = {s.name: torch.tensor(float(s.width), requires_grad=True) for s in arch.stages}
    total = sum(v for k, v in cost_terms(arch, w).items() if k.startswith("macs"))
    total.backward()
    base = {s.name: float(s.width) for s in arch.stages}
    # d MACs / d c1 by finite difference equals autograd, and includes the preprocess convs of c2 AND c3
    for name in ("c1", "c3"):
        hi = sum(v for k, v in cost_terms(arch, {**base, name: base[name] + 1}).items() if k.startswith("macs"))
        lo = sum(v for k, v in cost_terms(arch, {**base, name: base[name] - 1}).items() if k.startswith("macs"))
        assert float(w[name].grad) == pytest.approx((hi - lo) / 2, rel=1e-6)
    # c1's output reaches c3 (two stages on, across the reduction at c2): c3's preprocess0 runs at 8x8,
    # so a wider c1 must cost more MACs at 8x8 although c1 itself runs at 16x16
    wider = cost_terms(arch, {**base, "c1": base["c1"] + 4})
    assert wider["macs@8x8"] > cost_terms(arch, base)["macs@8x8"]


def test_baked_dense_equals_hard_masked_supernet():
    sn = supernet()
    sn.train()
    for i in range(3):  # move the BN statistics
        sn(x_batch(seed=i))
    sn.eval()
    x = x_batch(seed=9)
    for widths in (None, {s.name: 2 + (i % 3) * 2 for i, s in enumerate(sn.arch.stages)}):
        with torch.no_grad(), sn.hard(widths):
            ref = sn(x)
        _, dense = sn.dense(widths)
        with torch.no_grad():
            got = dense.eval()(x)
        assert (ref - got).abs().max() < 1e-5


def test_reallocation_keeps_chunked_weights_bit_exact_and_output_close():
    sn = supernet()
    sn.eval()
    x = x_batch()
    with torch.no_grad():
        before = sn(x)
    old_state = {k: v.clone() for k, v in sn.body.state_dict().items()}
    old_alloc = sn.allocated()
    sn.reallocate({k: v + 5 for k, v in old_alloc.items()})
    new_state = sn.body.state_dict()
    # a chunked input: cell 3's preprocess0 reads cell 1's output, 4 blocks of (allocated c1) channels
    name = "cells.2.preprocess0.1.weight"
    a_old, a_new = old_alloc["c0"], old_alloc["c0"] + 5
    o_old = old_alloc["c2"]
    for k in range(4):
        assert torch.equal(
            new_state[name][:o_old, k * a_new : k * a_new + a_old], old_state[name][:o_old, k * a_old : (k + 1) * a_old]
        )
    for key, old in old_state.items():  # every non-chunked tensor: prefix overlap bit-exact
        if key == name or "preprocess" in key or "head.1" in key or "classifier" in key:
            continue
        region = tuple(slice(0, n) for n in old.shape)
        assert torch.equal(new_state[key][region], old), key
    with torch.no_grad():
        after = sn(x)
    assert (after - before).abs().max() < 5e-3 * before.abs().max()


def test_momentum_transplant_respects_the_chunks():
    sn = supernet()
    opt = torch.optim.SGD(sn.weight_parameters(), lr=0.1, momentum=0.9)
    loss = sn(x_batch()).square().mean()
    loss.backward()
    opt.step()
    old_alloc = sn.allocated()
    old_body = sn.reallocate({k: v + 3 for k, v in old_alloc.items()})
    new_opt = torch.optim.SGD(sn.weight_parameters(), lr=0.1, momentum=0.9)
    transplant_optimizer(opt, old_body, new_opt, sn.body)
    old_params, new_params = dict(old_body.named_parameters()), dict(sn.body.named_parameters())
    name = "cells.2.preprocess0.1.weight"
    old_buf, new_buf = (
        opt.state[old_params[name]]["momentum_buffer"],
        new_opt.state[new_params[name]]["momentum_buffer"],
    )
    a_old = old_alloc["c0"]
    a_new = a_old + 3
    o = old_alloc["c2"]
    for k in range(4):
        assert torch.equal(new_buf[:o, k * a_new : k * a_new + a_old], old_buf[:o, k * a_old : (k + 1) * a_old])
        assert not new_buf[:, k * a_new + a_old : (k + 1) * a_new].any()
    assert isinstance(sn.body.cells[2].preprocess0[1], ChunkedConv2d)


def test_auxiliary_head_is_training_only_and_dropped_from_saved_state(tmp_path):
    from flexslim.recipe.schema import Recipe, TrainConfig
    from flexslim.train.checkpoint import load_model, save_model

    arch = darts_arch()
    net = build_network(arch, auxiliary=True)
    net.train()
    net(x_batch())
    assert net.aux_logits is not None and net.aux_logits.shape == (4, 10)
    net.eval()
    net(x_batch())
    assert net.aux_logits is None
    save_model(tmp_path / "m.pt", arch, net, Recipe(train=TrainConfig(epochs=1)), [])
    _, loaded, _ = load_model(tmp_path / "m.pt")
    assert not any(k.startswith("auxiliary.") for k in loaded.state_dict())
    with torch.no_grad():
        assert torch.allclose(loaded(x_batch()), net.eval()(x_batch()))


def test_darts_smoke_recipe_searches_bakes_exports_and_validates(tmp_path, monkeypatch):
    """The DARTS family end to end: search, the measured bake, the release (dynamo) export of the cells and the
    gate. The latency model is a hand-made table (fitting one times ~13 DARTS networks, and the latency model has
    its own tests); the bake and the gate time for real."""
    from search_fixtures import hand_latency_model, sets
    from typer.testing import CliRunner

    from flexslim.cli import app
    from flexslim.data.sources import load_dataset
    from flexslim.recipe.schema import load_recipe

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("darts-smoke", [])
    hand_latency_model(Arch.for_data(recipe.model, load_dataset(recipe.data)), recipe.latency).save("t.json")
    runner = CliRunner()
    fast = sets(
        "data.train_subset=40",  # 400 images: the suite trains on one thread, and a DARTS step is slow
        "search.epochs=1",
        "train.epochs=1",
        "latency.runs=5",
        "latency.min_seconds=0",
        "latency.bake_seconds=0",
        "latency.warmup=1",
        "latency.repeats=1",
        "search.batch_size=64",
        "train.batch_size=64",
        "search.trim=false",  # the measured bake is family-agnostic (test_bake); 16 DARTS exports cost ~30 s here
    )
    res = runner.invoke(
        app, ["search", "--recipe", "darts-smoke", "--latency-ms", "5.0", "--latency-table", "t.json", *fast]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", "model.onnx"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["validate", "model.onnx", "--latency-ms", "5.0", "--runs", "5", "--warmup", "1"])
    assert res.exit_code == 0, res.output
