"""Algorithm 1 + the budget controller on the quickstart digits, with a latency model of known coefficients
(deterministic: intercept + 0.05 ms per million MACs), so "tighter budget => smaller widths" is exact."""

import dataclasses
import itertools
import json
import math

import pytest
import torch
from search_fixtures import HISTORY_FIELDS, TINY_SET, hand_latency_model, make_supernet, single_thread  # noqa: F401

from flexslim.data.sources import load_dataset
from flexslim.latency.budget import Budget
from flexslim.models.arch import Arch
from flexslim.recipe.schema import load_recipe
from flexslim.search.loop import SearchFolder, load_state, run_search
from flexslim.search.supernet import Supernet
from flexslim.system.console import Reporter
from flexslim.train.schedules import cosine_lr

CPU = torch.device("cpu")
EPOCHS = 2
FIELDS = HISTORY_FIELDS


def search(arch, recipe, ds, budget_ms, latency, run_dir=None, resume=False, **kw):
    """run_search for `budget_ms` with the recipe's margins (in `run_dir` when given)."""
    folder = SearchFolder(run_dir, resume) if run_dir is not None else None
    return run_search(arch, recipe, ds, budget=Budget(budget_ms, headroom=0.05), latency=latency, device=CPU,
                      folder=folder, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    # no weight-only warm-up: these searches test the controller from the first epoch (the warm-up has its own tests)
    recipe = load_recipe("quickstart", [f"search.epochs={EPOCHS}", "search.batch_size=128", "search.warmup=0"])
    ds = load_dataset(recipe.data)
    arch = Arch.for_data(recipe.model, ds)
    init_ms = float(hand_latency_model(arch).predict(arch.widths))
    return recipe, ds, arch, init_ms


@pytest.fixture(scope="module")
def searches(setup):
    """Two short searches from the same start: budget 0.4x and 2.5x the initial network's latency."""
    recipe, ds, arch, init_ms = setup
    out = {}
    for name, factor in (("tight", 0.4), ("loose", 2.5)):
        model = hand_latency_model(arch)
        out[name] = (search(arch, recipe, ds, factor * init_ms, model), model, factor * init_ms)
    return out


# -- pieces ---------------------------------------------------------------------------------------------
def test_cosine_lr():
    assert cosine_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert cosine_lr(0.1, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(0.1, 250, 100) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    lrs = [cosine_lr(0.025, s, 37) for s in range(38)]
    assert all(b <= a for a, b in itertools.pairwise(lrs))
    assert cosine_lr(0.1, 0, 0) == pytest.approx(0.1)  # no division by zero


def _set_mu(sn: Supernet, **mu):
    with torch.no_grad():
        for k, v in mu.items():
            sn.masks[k].mu.fill_(v)


def test_next_allocation_grows_at_once():
    sn = make_supernet()  # sigma 2, allocated a 14, b 22, c 30
    _set_mu(sn, a=8.5, b=16.0, c=24.0)
    # a: ceil(8.5 + 6) = 15 > 14: grows by a single channel right away; b, c: exactly at target
    assert sn.next_allocation(3.0, 0.5) == {"a": 15, "b": 22, "c": 30}
    _set_mu(sn, a=40.2)
    assert sn.next_allocation(3.0, 0.5)["a"] == math.ceil(40.2 + 6)
    assert sn.next_allocation(1.0, 0.5)["a"] == math.ceil(40.2 + 2)  # k from the recipe


def test_next_allocation_shrinks_only_past_hysteresis():
    sn = make_supernet()  # sigma 2: hysteresis 0.5 -> shrink only when the excess is more than 1 channel
    _set_mu(sn, a=7.0, b=15.0, c=19.5)
    # a: target 13, excess 1 = 0.5 sigma: kept; b: target 21, excess 1: kept; c: target 26, excess 4: shrinks
    assert sn.next_allocation(3.0, 0.5) == {"a": 14, "b": 22, "c": 26}
    _set_mu(sn, a=6.9)  # target still 13
    assert sn.next_allocation(3.0, 0.5)["a"] == 14
    _set_mu(sn, a=6.0)  # target 12, excess 2 > 1
    assert sn.next_allocation(3.0, 0.5)["a"] == 12
    assert sn.next_allocation(3.0, 2.0) == {"a": 14, "b": 22, "c": 30}  # a wide band keeps everything
    assert sn.next_allocation(3.0, 0.0) == {"a": 12, "b": 21, "c": 26}  # no band: follow the target exactly


def test_next_allocation_never_below_the_final_width():
    sn = make_supernet()
    _set_mu(sn, a=-50.0, b=-50.0, c=-50.0)
    alloc = sn.next_allocation(3.0, 0.5)
    assert all(alloc[k] >= sn.masks[k].final_width() >= sn.masks[k].min_width for k in alloc)


def test_the_loop_asks_no_mask_its_type():
    """The search loop and the supernet drive masks through the Mask contract only (issue 7)."""
    import inspect

    import flexslim.search.loop
    import flexslim.search.supernet

    for module in (flexslim.search.loop, flexslim.search.supernet):
        src = inspect.getsource(module)
        assert "hasattr(" not in src and "isinstance(" not in src, module.__name__


# -- whole searches ---------------------------------------------------------------------------------------
def test_search_reacts_to_the_budget(searches, setup):
    _, _, arch, _ = setup
    tight, loose = searches["tight"][0], searches["loose"][0]
    wt, wl = tight.supernet.final_widths(), loose.supernet.final_widths()
    assert all(wt[s] <= wl[s] for s in wt) and sum(wt.values()) < sum(wl.values()), (wt, wl)
    assert tight.history[-1]["expected_latency_ms"] < loose.history[-1]["expected_latency_ms"]
    # and each moved the right way from the recipe's widths
    assert sum(wt.values()) < sum(arch.widths.values()) < sum(wl.values())
    for s, w in arch.widths.items():
        assert tight.history[-1]["mu"][s] < w < loose.history[-1]["mu"][s]


def test_controller_pushes_down_when_over_budget(searches, setup):
    recipe, _, arch, init_ms = setup
    st, _, budget = searches["tight"]
    first = st.history[0]
    assert first["target_ms"] == pytest.approx(budget * (1 - 0.05)) and init_ms > 2 * budget
    assert first["multiplier"] > 0, "over budget: the multiplier must rise"
    assert all(first["mu"][s] < w for s, w in arch.widths.items()), "over budget: every mu must fall"
    assert first["expected_latency_ms"] < init_ms
    assert st.history[-1]["multiplier"] >= first["multiplier"]  # still over the target: keeps rising
    lat = [h["expected_latency_ms"] for h in st.history]
    assert all(b < a for a, b in itertools.pairwise(lat))


def test_controller_pulls_up_when_under_budget(searches, setup):
    _, _, arch, init_ms = setup
    st, _, budget = searches["loose"]
    assert init_ms < 0.5 * budget
    assert all(h["multiplier"] < 0 for h in st.history), "under budget: the multiplier must go negative"
    lat = [h["expected_latency_ms"] for h in st.history]
    assert all(b > a for a, b in itertools.pairwise(lat)) and lat[-1] < budget
    assert all(st.history[-1]["mu"][s] > w for s, w in arch.widths.items())


@pytest.mark.parametrize("which", ["tight", "loose"])
def test_history_lines_are_complete_and_consistent(searches, setup, which):
    recipe, ds, _, _ = setup
    st, model, budget = searches[which]
    cfg = recipe.search
    steps = min(len(ds.train_y) // 2, len(ds.train_y) - len(ds.train_y) // 2) // cfg.batch_size
    assert [h["epoch"] for h in st.history] == list(range(1, EPOCHS + 1))
    prev = None
    for h in st.history:
        assert FIELDS <= set(h), FIELDS - set(h)
        json.dumps(h)  # every line is plain JSON
        assert h["steps"] == steps and h["budget_ms"] == budget
        assert h["sigma"] == {s: cfg.sigma for s in h["mu"]}
        assert h["expected_latency_ms"] == pytest.approx(float(model.predict(h["expected_widths"])), rel=1e-6)
        for s, mu in h["mu"].items():
            target = max(h["final_widths"][s], math.ceil(mu + cfg.k_sigma * cfg.sigma))
            before, after = h["allocated_before"][s], h["allocated"][s]
            assert after == target or (after == before and 0 <= before - target <= cfg.hysteresis * cfg.sigma)
            assert h["final_widths"][s] % 8 == 0 and h["final_widths"][s] >= 8
            assert abs(h["expected_widths"][s] - mu) < 1.0 or mu < 8 + 3 * cfg.sigma
        if prev is not None:
            assert h["allocated_before"] == prev["allocated"]
            assert h["lr"] < prev["lr"]
        prev = h
    assert st.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ran to its end
    assert st.step == EPOCHS * steps and st.epoch == EPOCHS
    assert st.multiplier == st.history[-1]["multiplier"]


@pytest.mark.parametrize("which", ["tight", "loose"])
def test_state_after_search_is_the_reallocated_supernet(searches, which):
    st = searches[which][0]
    sn = st.supernet
    alloc = st.history[-1]["allocated"]
    assert sn.allocated() == alloc
    for spec, stage in zip(sn.arch.stages, sn.body.stages):
        assert stage[0].conv1[0].out_channels == alloc[spec.name]
    # the weight optimizer holds exactly the current body's parameters, each with (transplanted) momentum
    opt_params = [p for g in st.w_opt.param_groups for p in g["params"]]
    assert [id(p) for p in opt_params] == [id(p) for p in sn.weight_parameters()]
    assert all("momentum_buffer" in st.w_opt.state[p] for p in opt_params)
    assert all(st.w_opt.state[p]["momentum_buffer"].shape == p.shape for p in opt_params)
    # the arch optimizer still drives the same mus (they survive re-allocation)
    a_params = [p for g in st.a_opt.param_groups for p in g["params"]]
    assert [id(p) for p in a_params] == [id(m.mu) for m in sn.masks.values()]


# -- checkpoint and resume --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_setup(setup):
    _, ds, _, _ = setup
    recipe = load_recipe("quickstart", [*TINY_SET, "search.epochs=1", "search.batch_size=128"])
    arch = Arch.for_data(recipe.model, ds)
    return recipe, ds, arch


def test_checkpoint_round_trip(tiny_setup, tmp_path):
    recipe1, ds, arch = tiny_setup
    budget = 0.5 * float(hand_latency_model(arch).predict(arch.widths))
    st = search(arch, recipe1, ds, budget, hand_latency_model(arch), run_dir=tmp_path)
    lines = (tmp_path / "search.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == st.history[0]
    ckpt = tmp_path / "search_state.pt"
    assert ckpt.is_file()

    loaded = load_state(ckpt, arch, recipe1, CPU)
    assert (loaded.epoch, loaded.step, loaded.multiplier, loaded.history) == (
        st.epoch,
        st.step,
        st.multiplier,
        st.history,
    )
    assert loaded.supernet.allocated() == st.supernet.allocated()
    for a, b in ((loaded.supernet.masks, st.supernet.masks), (loaded.supernet.body, st.supernet.body)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for p_new, p_old in zip(loaded.supernet.weight_parameters(), st.supernet.weight_parameters()):
        assert torch.equal(loaded.w_opt.state[p_new]["momentum_buffer"], st.w_opt.state[p_old]["momentum_buffer"])
    for p_new, p_old in zip(loaded.supernet.arch_parameters(), st.supernet.arch_parameters()):
        assert all(
            torch.equal(loaded.a_opt.state[p_new][k], st.a_opt.state[p_old][k]) for k in ("exp_avg", "exp_avg_sq")
        )


def _without_clock(history):
    return [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in history]


def test_an_interrupted_search_resumes_exactly(tiny_setup, tmp_path):
    """Ctrl-C after epoch 1, then resume: the same trajectory as an uninterrupted (seeded, CPU) run, with the
    same batches, augmentations, weights, momentum, mu, Adam state and multiplier."""
    from flexslim.system.console import Reporter

    recipe1, ds, arch = tiny_setup
    recipe = dataclasses.replace(recipe1, search=dataclasses.replace(recipe1.search, epochs=2))
    assert recipe.data.crop_padding > 0  # augmentation is on: its random stream must survive the interruption
    budget = 0.5 * float(hand_latency_model(arch).predict(arch.widths))
    whole = search(arch, recipe, ds, budget, hand_latency_model(arch))

    class CtrlC(Reporter):
        def start(self, description, total):
            if description.startswith("search 2/"):
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search(arch, recipe, ds, budget, hand_latency_model(arch), run_dir=tmp_path, reporter=CtrlC())
    assert len((tmp_path / "search.jsonl").read_text().splitlines()) == 1
    resumed = search(arch, recipe, ds, budget, hand_latency_model(arch), run_dir=tmp_path, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert len((tmp_path / "search.jsonl").read_text().splitlines()) == 2
    assert _without_clock(resumed.history) == _without_clock(whole.history)
    assert resumed.supernet.final_widths() == whole.supernet.final_widths()
    for a, b in zip(resumed.supernet.parameters(), whole.supernet.parameters()):
        assert torch.equal(a, b)


def test_batch_larger_than_the_split_is_bad_input(tiny_setup):
    from flexslim.errors import BadInput

    recipe, ds, arch = tiny_setup
    big = dataclasses.replace(recipe, search=dataclasses.replace(recipe.search, batch_size=10_000))
    with pytest.raises(BadInput, match="batch_size"):
        search(arch, big, ds, 1.0, hand_latency_model(arch))


def test_warmup_epochs_train_the_weights_alone(setup):
    """search.warmup = 0.5 of 2 epochs: the first epoch moves neither mu nor the multiplier (and records so); the
    second searches."""
    recipe, ds, arch, init_ms = setup
    warm = dataclasses.replace(recipe, search=dataclasses.replace(recipe.search, warmup=0.5, init_multiplier=0.0))
    st = search(arch, warm, ds, 0.4 * init_ms, hand_latency_model(arch))
    first, second = st.history
    assert first["warmup"] and not second["warmup"]
    assert first["multiplier"] == 0.0 and first["arch_ce"] == 0.0
    assert all(first["mu"][s] == pytest.approx(w) for s, w in arch.widths.items())  # mu still at the start
    assert second["multiplier"] > 0 and all(second["mu"][s] < w for s, w in arch.widths.items())  # tight: down


def test_a_positive_warmup_is_at_least_one_epoch_of_a_search_of_two_or_more():
    """0.25 x 3 epochs rounds down to none: a search asked to warm up does so for one epoch; 0 and one-epoch searches
    have none, and longer ones keep the rounded-down share."""
    from flexslim.recipe.schema import SearchConfig
    from flexslim.search.loop import warmup_epochs

    got = {(w, e): warmup_epochs(SearchConfig(warmup=w, epochs=e)) for w in (0.0, 0.25, 0.5) for e in (1, 2, 3, 6, 20)}
    assert [got[(0.25, e)] for e in (1, 2, 3, 6, 20)] == [0, 1, 1, 1, 5]
    assert [got[(0.5, e)] for e in (1, 2, 3, 6, 20)] == [0, 1, 1, 3, 10]
    assert all(got[(0.0, e)] == 0 for e in (1, 2, 3, 6, 20))


def test_warmup_lets_cross_entropy_speak_for_the_widths(setup):
    """Oracle of the warm-up's effect on a toy problem (the digits): on untrained weights the cross-entropy barely
    depends on the widths, so only the latency term moves mu; after one weights-only epoch the cross-entropy's
    gradient with respect to mu is about twice as large (the latency term's is unchanged) - it can defend a width."""
    from flexslim.data.augment import Augment
    from flexslim.search.loop import SearchLoop, build_state, search_batches, train_epoch

    recipe, ds, arch, init_ms = setup
    warm = dataclasses.replace(recipe, search=dataclasses.replace(recipe.search, warmup=0.5))
    st = build_state(arch, warm, CPU)
    bt, bs = search_batches(ds, warm, 0)
    loop = SearchLoop(warm, Budget(init_ms, headroom=0.05), hand_latency_model(arch), CPU, Reporter(), len(bt))
    x, y = next(iter(bs))

    def ce_grad() -> float:
        st.supernet.eval()  # no dropout / BN batch statistics noise between the two readings
        ce = torch.nn.functional.cross_entropy(st.supernet(Augment(warm.data, seed=0)(x.float())), y)
        grads = torch.autograd.grad(ce, st.supernet.arch_parameters())
        return float(sum(g.abs().sum() for g in grads))

    before = ce_grad()
    train_epoch(st, loop, bt, bs, 0)  # a warm-up epoch: weights only
    assert all(float(m.mu.detach()) == pytest.approx(arch.widths[s]) for s, m in st.supernet.masks.items())
    assert ce_grad() > 1.5 * before
