"""The on-device latency model: analytic cost terms (against torch's FLOP counter), a real profile on the
CPU provider, differentiable prediction, persistence, compatibility checks and extension past the region."""

import copy
import dataclasses
import json
import math
import re

import pytest
import torch
from search_fixtures import FAST_LATENCY, hand_latency_model, single_thread, small_arch  # noqa: F401
from torch.utils.flop_counter import FlopCounterMode

from flexslim.errors import BadInput
from flexslim.latency.model import LatencyModel
from flexslim.latency.profiling import measure, profile
from flexslim.models.families import build_network, cost_terms
from flexslim.recipe.schema import StageSpec

MIN_WIDTH, ROUND_TO = 8, 8


@pytest.fixture(scope="module")
def profiled():
    """One real profile of small_arch on onnxruntime's CPU provider (6 networks, a few seconds)."""
    return profile(small_arch(), FAST_LATENCY, MIN_WIDTH, ROUND_TO)


# -- analytic cost terms vs torch's FLOP counter ---------------------------------------------------------
def counted_macs(arch, widths) -> float:
    """MACs per image of the width-dependent layers, by FlopCounterMode: total - stem conv (- fixed classifier)."""
    net = build_network(arch, widths).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.rand(1, *arch.input_shape))
    c, h, w = arch.input_shape
    macs = counter.get_total_flops() / 2
    macs -= 9 * c * arch.stem_width * h * w  # the stem: fixed, a constant in the model's intercept
    if arch.head_width:
        macs -= arch.head_width * arch.num_classes  # classifier after a fixed head: also constant
    return macs


def counted_activations(arch, widths) -> float:
    """Output elements of the convs inside the stages (the `act@` terms), by forward hooks."""
    net = build_network(arch, widths).eval()
    total = [0]
    for m in net.stages.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o: total.__setitem__(0, total[0] + o[0].numel()))
    with torch.no_grad():
        net(torch.rand(1, *arch.input_shape))
    return total[0]


def _sum(terms, prefix):
    return sum(float(v) for k, v in terms.items() if k.startswith(prefix)) * 1e6


DEEP = (StageSpec("a", 8, 2, 1), StageSpec("b", 16, 3, 2), StageSpec("c", 24, 2, 2))


@pytest.mark.parametrize(
    "arch,widths",
    [
        (small_arch(), {"a": 8, "b": 16, "c": 24}),
        (small_arch(), {"a": 3, "b": 40, "c": 7}),
        (small_arch(head_width=20), {"a": 16, "b": 8, "c": 32}),
        (small_arch(input_shape=(3, 15, 11), stages=DEEP), {"a": 12, "b": 20, "c": 44}),
        (small_arch(input_shape=(3, 15, 11), stages=DEEP, head_width=9), {"a": 5, "b": 8, "c": 13}),
    ],
)
def test_cost_terms_match_flop_counter(arch, widths):
    terms = cost_terms(arch, widths)
    assert _sum(terms, "macs@") == pytest.approx(counted_macs(arch, widths), rel=1e-9)
    assert _sum(terms, "act@") == pytest.approx(counted_activations(arch, widths), rel=1e-9)


def test_cost_terms_are_grouped_by_resolution():
    terms = cost_terms(small_arch(), {"a": 8, "b": 16, "c": 24})
    assert set(terms) == {"macs@16x16", "act@16x16", "macs@8x8", "act@8x8", "macs@4x4", "act@4x4", "macs@head"}


def test_cost_terms_are_differentiable_and_agree_with_integer_widths():
    arch = small_arch()
    w = {
        "a": torch.tensor(10.5, requires_grad=True),
        "b": torch.tensor(17.0, requires_grad=True),
        "c": torch.tensor(23.25, requires_grad=True),
    }
    terms = cost_terms(arch, w)
    total = sum(terms.values())
    grads = torch.autograd.grad(total, list(w.values()))
    assert all(float(g) > 0 for g in grads)
    at_int = cost_terms(arch, {"a": 10, "b": 17, "c": 23})
    at_int_t = cost_terms(arch, {k: torch.tensor(float(v)) for k, v in {"a": 10, "b": 17, "c": 23}.items()})
    assert {k: float(v) for k, v in at_int.items()} == pytest.approx({k: float(v) for k, v in at_int_t.items()})


# -- a real profile ---------------------------------------------------------------------------------------
def test_profile_fits_finite_non_negative_coefficients(profiled):
    m = profiled
    assert m.provider == "cpu" and m.runtime.startswith("onnxruntime")
    assert len(m.fit_points) == FAST_LATENCY.samples and len(m.holdout_points) == FAST_LATENCY.holdout
    assert m.terms == sorted(cost_terms(m.arch, m.arch.widths))
    assert len(m.coef) == len(m.terms)
    assert all(math.isfinite(c) and c >= 0 for c in m.coef)
    assert math.isfinite(m.intercept) and m.intercept >= 0
    assert m.region == {"a": [8, 16], "b": [8, 32], "c": [8, 48]}
    for p in m.fit_points + m.holdout_points:
        assert m.covers(p.widths)
        assert p.ms > 0 and math.isfinite(p.ms) and p.p50_ms <= p.ms * (1 + 1e-9)  # p90 >= p50
        assert all(w % ROUND_TO == 0 or w == MIN_WIDTH for w in p.widths.values())
    assert m.measure_seconds > 0


def test_profile_measures_the_floor_at_min_width(profiled):
    m = profiled
    assert m.fit_points[0].widths == {"a": MIN_WIDTH, "b": MIN_WIDTH, "c": MIN_WIDTH}
    assert m.floor_ms == m.fit_points[0].ms > 0
    assert m.fit_points[1].widths == m.arch.widths  # the recipe's own network
    assert m.fit_points[2].widths == {"a": 16, "b": 32, "c": 48}  # the top of the region


def test_profile_reports_its_error_on_held_out_networks(profiled):
    e = profiled.error_summary()
    assert e["holdout"] == FAST_LATENCY.holdout
    assert 0 <= e["median_pct"] <= e["max_pct"] and math.isfinite(e["max_pct"])
    # the error is computed on the hold-out points, which the fit never uses
    expected = [100 * abs(float(profiled.predict(p.widths)) - p.ms) / p.ms for p in profiled.holdout_points]
    assert e["max_pct"] == pytest.approx(max(expected))
    refit = copy.deepcopy(profiled)
    refit.holdout_points = []
    refit.fit()
    assert refit.coef == profiled.coef and refit.intercept == profiled.intercept


def test_profile_predicts_the_fit_points_roughly(profiled):
    """A sanity bound, generous for a loaded machine: the fit is not off by an order of magnitude."""
    for p in profiled.fit_points:
        assert 0.2 * p.ms < float(profiled.predict(p.widths)) < 5 * p.ms


def test_profile_needs_three_samples():
    with pytest.raises(BadInput, match="samples"):
        profile(small_arch(), dataclasses.replace(FAST_LATENCY, samples=2), MIN_WIDTH, ROUND_TO)


def test_measure_times_the_gate_statistic():
    t = measure(small_arch(), {"a": 8, "b": 8, "c": 8}, FAST_LATENCY)
    assert t.provider == "cpu" and t.batch == FAST_LATENCY.batch and t.runs == FAST_LATENCY.runs
    assert t.percentile == FAST_LATENCY.percentile and t.at_percentile_ms == t.p90_ms > 0


# -- prediction -------------------------------------------------------------------------------------------
def test_predict_is_differentiable_in_tensor_widths(profiled):
    widths = {k: torch.tensor(float(v) + 0.3, requires_grad=True) for k, v in profiled.arch.widths.items()}
    lat = profiled.predict(widths)
    assert torch.is_tensor(lat) and lat.requires_grad
    grads = torch.autograd.grad(lat, list(widths.values()))
    assert all(g is not None and math.isfinite(float(g)) and float(g) >= 0 for g in grads)
    plain = profiled.predict({k: float(v.detach()) for k, v in widths.items()})
    assert float(lat.detach()) == pytest.approx(float(plain), rel=1e-6)


def test_predict_gradient_matches_finite_differences_of_a_known_model():
    arch = small_arch()
    model = hand_latency_model(arch, ms_per_mmac=0.07, intercept=0.02)
    model.coef = [0.07 if t.startswith("macs") else 0.3 for t in model.terms]  # act terms count too
    base = {"a": 11.0, "b": 19.0, "c": 29.0}
    widths = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in base.items()}
    grads = torch.autograd.grad(model.predict(widths), list(widths.values()))
    for (k, v), g in zip(base.items(), grads):
        h = 1e-3
        fd = (float(model.predict({**base, k: v + h})) - float(model.predict({**base, k: v - h}))) / (2 * h)
        assert float(g) == pytest.approx(fd, rel=1e-6) and float(g) > 0
    # the value is intercept + sum coef * term
    terms = cost_terms(arch, base)
    assert float(model.predict(base)) == pytest.approx(
        0.02 + sum(c * float(terms[t]) for t, c in zip(model.terms, model.coef))
    )


def test_fit_recovers_known_coefficients_from_exact_points():
    """nnls on noise-free points generated by a known non-negative model returns that model."""
    from flexslim.latency.model import Point

    arch = small_arch()
    truth = hand_latency_model(arch, ms_per_mmac=0.04, intercept=0.015)
    truth.coef = [0.04 if t.startswith("macs@16") else 0.02 if t.startswith("macs") else 0.0 for t in truth.terms]
    grid = [{"a": a, "b": b, "c": c} for a in (8, 16, 24, 40) for b in (8, 24, 48) for c in (8, 32, 64)]
    fitted = copy.deepcopy(truth)
    fitted.fit_points = [Point(w, float(truth.predict(w)), float(truth.predict(w))) for w in grid]
    fitted.fit()
    for w in grid + [{"a": 13, "b": 37, "c": 51}]:
        assert float(fitted.predict(w)) == pytest.approx(float(truth.predict(w)), rel=1e-4)


# -- persistence and compatibility ---------------------------------------------------------------------------
def test_save_load_round_trip(profiled, tmp_path):
    path = profiled.save(tmp_path / "lat.json")
    loaded = LatencyModel.load(path)
    assert loaded.to_dict() == profiled.to_dict()
    d = json.loads(path.read_text())
    assert d["error"] == profiled.error_summary() and d["floor_ms"] == profiled.floor_ms
    assert d["key"]["provider"] == "cpu" and d["key"]["batch"] == FAST_LATENCY.batch
    for w in ({"a": 8, "b": 8, "c": 8}, {"a": 13, "b": 27, "c": 40}):
        assert float(loaded.predict(w)) == float(profiled.predict(w))
    loaded.check_compatible(profiled.arch, FAST_LATENCY, "t")  # no error
    # a table of the same structure with other widths is still compatible
    loaded.check_compatible(profiled.arch.with_widths({"a": 32}), FAST_LATENCY, "t")


def test_check_compatible_rejects_another_structure_or_other_settings(profiled):
    other_blocks = small_arch(stages=(StageSpec("a", 8, 2, 1), StageSpec("b", 16, 2, 2), StageSpec("c", 24, 1, 2)))
    other_input = small_arch(input_shape=(3, 16, 16))
    other_head = small_arch(head_width=16)
    for arch in (other_blocks, other_input, other_head):
        with pytest.raises(BadInput, match="another network structure"):
            profiled.check_compatible(arch, FAST_LATENCY, "table.json")
    for change, both in [
        ({"batch": 16}, "batch 8 (the recipe's latency.batch: 16)"),
        ({"threads": 2}, "threads 1 (the recipe's latency.threads: 2)"),
        ({"percentile": 50.0}, "percentile 90 (the recipe's latency.percentile: 50)"),
    ]:
        with pytest.raises(BadInput, match=re.escape(both)):
            profiled.check_compatible(profiled.arch, dataclasses.replace(FAST_LATENCY, **change), "table.json")


def test_check_compatible_compares_the_provider_that_ran(profiled):
    cuda_table = copy.deepcopy(profiled)
    cuda_table.provider = "cuda"
    with pytest.raises(BadInput, match=re.escape("provider cuda (the recipe's latency.provider: cpu)")):
        cuda_table.check_compatible(profiled.arch, FAST_LATENCY, "table.json")
    auto = dataclasses.replace(FAST_LATENCY, provider="auto")  # auto runs cpu where CUDA cannot load
    from flexslim.latency.runtime import cuda_usable

    if not cuda_usable():
        profiled.check_compatible(profiled.arch, auto, "table.json")
        with pytest.raises(BadInput, match=re.escape("(the recipe's latency.provider: auto, which runs cpu here)")):
            cuda_table.check_compatible(profiled.arch, auto, "table.json")


def test_load_rejects_what_is_not_a_table(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        LatencyModel.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for text in ("not json", "{}", json.dumps({"version": 99}), json.dumps({"version": 1, "arch": {}})):
        bad.write_text(text)
        with pytest.raises(BadInput):
            LatencyModel.load(bad)


# -- the probe: the runtime's channel block --------------------------------------------------------------------
def _stepped(block: int, widths, noise: float = 0.0):
    """A fake runtime whose cost steps every `block` channels (width charged at the next block), quadratic."""
    import random

    rng = random.Random(0)
    return {w: (0.01 + 1e-5 * (block * math.ceil(w / block)) ** 2) * (1 + noise * rng.uniform(-1, 1)) for w in widths}


@pytest.mark.parametrize("block", [8, 16, 32])
def test_detect_block_finds_a_step_every_block_channels(block):
    from flexslim.latency.profiling import detect_block

    widths = range(8, 129, 4)
    assert detect_block(_stepped(block, widths)) == block
    assert detect_block(_stepped(block, widths, noise=0.01)) == block  # 1% timing noise does not hide it


def test_detect_block_sees_the_steps_of_the_narrow_networks_under_the_noise_of_the_wide_ones():
    """The probe curve measured on a 2-core AMD VM (quickstart family at 16x16, every stage at w; one-session probe
    timings, ms): 24 costs what 32 costs, 40 what 48 costs, 56 what 64 costs, while the widest networks (1 ms and
    more) scatter by more than the narrow ones' steps are worth. Fitted in absolute terms it read block 1."""
    from flexslim.latency.profiling import detect_block

    measured = {8: 0.0349, 16: 0.0409, 24: 0.1019, 32: 0.0992, 40: 0.2013, 48: 0.2062, 56: 0.3286, 64: 0.3574,
                80: 0.5347, 96: 0.8770, 112: 1.1604, 128: 1.2945}  # fmt: skip
    assert detect_block(measured) == 16


def test_detect_block_of_a_smooth_runtime_is_the_probe_step():
    from flexslim.latency.profiling import detect_block

    smooth = {w: 0.01 + 1e-5 * w * w for w in range(8, 129, 4)}
    assert detect_block(smooth) <= 4


def test_probe_block_times_every_stage_at_one_width_and_detects_16():
    from flexslim.latency.profiling import probe_block
    from flexslim.latency.runtime import Timing

    seen = []

    def fake(arch, widths, settings, seed):
        assert len(set(widths.values())) == 1  # every stage at the same width
        seen.append(next(iter(widths.values())))
        ms = _stepped(16, [seen[-1]])[seen[-1]]
        return Timing("cpu", 8, (8, 1, 16, 16), 1, 0, 1, 90.0, ms, ms, ms, ms, "fake"), (ms,)

    from flexslim.system.console import Reporter

    block, table = probe_block(small_arch(), FAST_LATENCY, MIN_WIDTH, fake, Reporter())
    assert block == 16 and seen == sorted(seen) and seen[0] == MIN_WIDTH and seen[-1] >= 64
    assert set(table) == {str(w) for w in seen}


def test_probe_stops_at_128_channels_however_wide_the_family():
    """A ResNet-50-like family (stages to 2048): every 4 channels to 64, every 8 to 128, nothing wider."""
    from flexslim.latency.profiling import probe_block
    from flexslim.latency.runtime import Timing
    from flexslim.system.console import Reporter

    seen = []

    def fake(arch, widths, settings, seed):
        seen.append(next(iter(widths.values())))
        ms = _stepped(16, [seen[-1]])[seen[-1]]
        return Timing("cpu", 8, (8, 1, 16, 16), 1, 0, 1, 90.0, ms, ms, ms, ms, "fake"), (ms,)

    wide = small_arch().with_widths({"a": 512, "b": 1024, "c": 2048})
    block, _ = probe_block(wide, FAST_LATENCY, 4, fake, Reporter())
    assert block == 16
    assert seen == list(range(4, 65, 4)) + list(range(72, 129, 8))


def test_effective_widths_charge_the_next_block_and_expectation_is_exact_at_whole_widths(profiled):
    m = copy.deepcopy(profiled)
    m.block = 16
    assert m.effective({"a": 8, "b": 17, "c": 32}) == {"a": 16, "b": 32, "c": 32}
    assert float(m.predict({"a": 24, "b": 24, "c": 40})) == float(m.predict({"a": 32, "b": 32, "c": 48}))
    # a point mass on one option: the expectation is the prediction at that width
    dist = {s: (torch.tensor([8.0, 24.0, 40.0]), torch.tensor([0.0, 1.0, 0.0])) for s in ("a", "b", "c")}
    assert float(m.predict_expected(dist)) == pytest.approx(float(m.predict({"a": 24, "b": 24, "c": 24})))
    # and it is differentiable in whatever made the weights
    mu = torch.tensor(20.0, requires_grad=True)
    f = torch.arange(8.0, 49.0)
    w = torch.softmax(-0.5 * ((f - mu) / 4.0) ** 2, dim=0)
    lat = m.predict_expected({"a": (f, w), "b": (f, w), "c": (f, w)})
    (g,) = torch.autograd.grad(lat, [mu])
    assert math.isfinite(float(g)) and float(g) > 0


def test_a_width_under_the_block_is_charged_as_itself_when_the_table_says_so(tmp_path):
    m = hand_latency_model(small_arch(), FAST_LATENCY)  # known coefficients: every MAC costs (a measured fit may
    m.block = 16  # give one resolution's term no weight at all)
    m.below_block = "width"
    assert m.effective({"a": 8, "b": 17, "c": 16}) == {"a": 8.0, "b": 32, "c": 16}
    assert float(m.predict({"a": 8, "b": 16, "c": 16})) < float(m.predict({"a": 16, "b": 16, "c": 16}))
    # the expectation charges options under the block as themselves, those above at the block
    dist = {s: (torch.tensor([8.0, 24.0]), torch.tensor([0.5, 0.5])) for s in ("a", "b", "c")}
    want = {s: 0.5 * 8.0 + 0.5 * 32.0 for s in ("a", "b", "c")}
    assert float(m.predict_expected(dist)) == pytest.approx(float(m._linear(want)))
    # kept by the table, and a table saying anything else is refused
    m.save(tmp_path / "t.json")
    assert LatencyModel.load(tmp_path / "t.json").below_block == "width"
    d = json.loads((tmp_path / "t.json").read_text())
    d["below_block"] = "half"
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(BadInput, match="below_block"):
        LatencyModel.load(tmp_path / "bad.json")
    del d["below_block"]  # a table from before the key: padded, as it was
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert LatencyModel.load(tmp_path / "old.json").below_block == "block"


@pytest.mark.parametrize("narrow_saves,charged", [(0.15, "width"), (0.0, "block"), (0.03, "block")])
def test_profile_measures_how_a_width_under_the_block_is_charged(narrow_saves, charged):
    """A fake runtime with a 16-channel block whose networks of 8-channel stages are `narrow_saves` cheaper than the
    same at 16: the profile times the all-16 network beside the floor and the table charges 8 by that."""
    from flexslim.latency.runtime import Timing

    seen = []

    def fake(arch, widths, settings, seed):
        seen.append(dict(widths))
        ms = 0.01 + sum(1e-5 * (16 * math.ceil(w / 16)) ** 2 for w in widths.values())
        ms *= 1 - narrow_saves * sum(w < 16 for w in widths.values()) / len(widths)
        return Timing("cpu", 8, (8, 1, 16, 16), 1, 0, 1, 90.0, ms, ms, ms, ms, "fake"), (ms,)

    settings = dataclasses.replace(FAST_LATENCY, probe=True, samples=6, holdout=2)
    m = profile(small_arch(), settings, MIN_WIDTH, 0, measurer=fake)
    assert m.block == 16 and m.below_block == charged
    assert len(m.probe) >= 8 and m.probe["16"] < m.probe["24"] == pytest.approx(m.probe["32"])  # the probe's curve kept
    assert {"a": 16, "b": 16, "c": 16} in [p.widths for p in m.fit_points]
    assert {"a": 8, "b": 8, "c": 8} == m.fit_points[0].widths


def test_sampled_networks_reach_min_width_under_the_grid():
    """The bake delivers min_width (8) under a grid of 16: the fit and hold-out networks must include it."""
    import random

    from flexslim.latency.profiling import _sample

    rng = random.Random(0)
    region = {"a": [8, 64], "b": [8, 32]}
    drawn = [_sample(rng, region, 16) for _ in range(200)]
    assert {d["a"] for d in drawn} == {8, 16, 32, 48, 64} and {d["b"] for d in drawn} == {8, 16, 32}


# -- measuring where the budget is -------------------------------------------------------------------------------
def _cost_timer(arch, widths, settings, seed):
    """A deterministic timer: a fixed part plus one proportional to the network's MACs (no runtime noise)."""
    from flexslim.latency.runtime import Timing

    ms = 0.02 + 2e-8 * counted_macs(arch, widths)
    return Timing("cpu", 8, (8, *arch.input_shape), 1, 0, 1, 90.0, ms, ms, ms, ms, "fake"), (ms,)


def test_refine_measures_networks_predicted_near_the_budget_and_saves_them_in_the_table():
    from flexslim.latency.model import NEAR
    from flexslim.latency.profiling import refine

    m = profile(small_arch(), FAST_LATENCY, MIN_WIDTH, ROUND_TO, measurer=_cost_timer)
    n_fit, n_hold = len(m.fit_points), len(m.holdout_points)
    budget = float(m.predict({"a": 16, "b": 24, "c": 32}))
    settings = dataclasses.replace(m.settings, near=len(m.near(budget)) + 2)  # two more needed near it
    m.settings = settings
    assert refine(m, [budget], grid=ROUND_TO, measurer=_cost_timer) is True
    new_fit, new_hold = m.fit_points[n_fit:], m.holdout_points[n_hold:]
    assert 1 <= len(new_fit) <= 2 and len(new_hold) == 1
    for p in new_fit + new_hold:
        assert p.ms > 0
        assert all(w % ROUND_TO == 0 or w == MIN_WIDTH for w in p.widths.values())
        assert abs(p.ms / budget - 1) <= 4 * NEAR, "picked by the prediction, so measured close to the budget"
    assert budget in m.budgets
    widths = [tuple(sorted(p.widths.items())) for p in m.fit_points + m.holdout_points]
    assert len(widths) == len(set(widths)), "no network measured twice"
    # a budget already refined for is not measured again, whatever its band holds
    assert refine(m, [budget], grid=ROUND_TO, measurer=_cost_timer) is False


def test_a_budget_beyond_the_box_grows_the_box_until_it_reaches_it_then_refines_there():
    """The box's top (2 x the recipe's widths) measures under half the budget: refine doubles the top, measures it
    with a few networks of the grown box (at most EXTENSIONS times), and only then measures networks near the
    budget - which now lie inside the box, so the model interpolates there. A budget the box reaches grows nothing."""
    from flexslim.latency.profiling import EXTENSIONS, refine

    m = profile(small_arch(), FAST_LATENCY, MIN_WIDTH, ROUND_TO, measurer=_cost_timer)
    top = {s: hi for s, (_, hi) in m.region.items()}
    reached = float(m.predict(top))
    refine(m, [0.95 * reached], grid=ROUND_TO, measurer=_cost_timer)
    assert {s: hi for s, (_, hi) in m.region.items()} == top  # within reach: the box stays

    m = profile(small_arch(), FAST_LATENCY, MIN_WIDTH, ROUND_TO, measurer=_cost_timer)
    budget = 3 * reached
    assert refine(m, [budget], grid=ROUND_TO, measurer=_cost_timer) is True
    grown = {s: hi for s, (_, hi) in m.region.items()}
    assert all(top[s] < grown[s] <= top[s] * 2**EXTENSIONS for s in top)
    assert grown in [p.widths for p in m.fit_points]  # the new top is measured, not extrapolated
    near = m.near(budget)
    assert near and all(m.covers(p.widths) for p in near)


def test_points_keep_their_sessions_and_the_model_its_timing_spread():
    from flexslim.latency.model import Point

    m = hand_latency_model(small_arch())
    m.fit_points = [Point({"a": 8}, 1.0, 0.9, (0.98, 1.0, 1.03)), Point({"a": 16}, 2.0, 1.8, (1.9, 2.0, 2.02))]
    assert m.fit_points[0].spread() == pytest.approx(0.03) and m.fit_points[1].spread() == pytest.approx(0.05)
    assert m.noise() == pytest.approx(0.04)
    assert Point({"a": 8}, 1.0, 0.9).spread() is None


def test_measure_takes_the_median_session(monkeypatch):
    from flexslim.latency.profiling import measure_sessions

    settings = dataclasses.replace(FAST_LATENCY, repeats=3, min_seconds=0.0)
    t, sessions = measure_sessions(small_arch(), {"a": 8, "b": 8, "c": 8}, settings)
    assert len(sessions) == 3 and list(sessions) == sorted(sessions)
    assert t.at_percentile_ms == sessions[1]


def test_a_version_1_table_is_refused_with_the_fix(tmp_path, profiled):
    d = profiled.to_dict()
    d["version"] = 1
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    with pytest.raises(BadInput, match="re-profile"):
        LatencyModel.load(path)
