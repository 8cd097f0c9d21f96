"""fit_to_budget: measure the baked network, trim round_to channels at a time until it meets the budget."""

import dataclasses
import statistics

import pytest
from search_fixtures import FAST_LATENCY, hand_latency_model, single_thread, small_arch  # noqa: F401

from flexslim.budget import Budget
from flexslim.errors import BadInput
from flexslim.latency import measure
from flexslim.runtime import Timing
from flexslim.trim import fit_to_budget

MIN_WIDTH, ROUND_TO, MARGIN = 8, 8, 0.03
START = {"a": 32, "b": 64, "c": 96}


def fit(
    arch,
    widths,
    budget_ms,
    latency,
    settings=FAST_LATENCY,
    min_width=MIN_WIDTH,
    round_to=ROUND_TO,
    margin=MARGIN,
    **kwargs,
):
    """fit_to_budget with the budget and its trim margin as one Budget value."""
    return fit_to_budget(
        arch,
        widths,
        budget=Budget(budget_ms, trim_margin=margin),
        latency=latency,
        settings=settings,
        min_width=min_width,
        round_to=round_to,
        **kwargs,
    )


def _median_ms(arch, widths, n=3) -> float:
    return statistics.median(measure(arch, widths, FAST_LATENCY).at_percentile_ms for _ in range(n))


def _check_trims(start: dict, result, min_width=MIN_WIDTH, round_to=ROUND_TO):
    widths = dict(start)
    for t in result.trims:
        assert t["from"] == widths[t["stage"]] and t["to"] == t["from"] - round_to
        assert t["to"] >= min_width
        assert t["measured_ms"] > t["limit_ms"]  # a trim only happens when the network measured over the limit
        widths[t["stage"]] = t["to"]
    assert widths == result.widths
    assert all(result.widths[s] <= start[s] for s in start)
    assert all((start[s] - result.widths[s]) % round_to == 0 for s in start)
    assert all(w >= min_width for w in result.widths.values())


# -- real measurements on onnxruntime's CPU provider ---------------------------------------------------------
def test_budget_above_the_measured_latency_changes_nothing():
    arch = small_arch()
    res = fit(arch, START, 1000.0, hand_latency_model(arch), FAST_LATENCY, MIN_WIDTH, ROUND_TO, MARGIN)
    assert res.widths == START and res.trims == []
    assert 0 < res.measured_ms <= 1000.0 * (1 - MARGIN) and res.p50_ms <= res.measured_ms
    assert res.provider == "cpu"


def test_budget_between_floor_and_current_latency_trims_until_it_fits():
    arch = small_arch()
    floor = _median_ms(arch, {s: MIN_WIDTH for s in START})
    current = _median_ms(arch, START)
    assert current > 2.5 * floor, f"the start network ({current:.4f} ms) should be far above the floor ({floor:.4f} ms)"
    budget = (floor * current) ** 0.5  # geometric middle: >= 1.6x away from both, room for timing noise
    res = fit(arch, START, budget, hand_latency_model(arch), FAST_LATENCY, MIN_WIDTH, ROUND_TO, MARGIN)
    assert res.trims, "a budget well below the network's latency must trim"
    _check_trims(START, res)
    assert res.widths != START
    assert res.measured_ms <= budget * (1 - MARGIN)
    assert res.trims[-1]["limit_ms"] == pytest.approx(budget * (1 - MARGIN))


def test_impossible_budget_is_bad_input_naming_min_width():
    arch = small_arch()
    with pytest.raises(BadInput, match=r"min_width 8") as err:
        fit(arch, {"a": 16, "b": 8, "c": 16}, 1e-6, hand_latency_model(arch), FAST_LATENCY, MIN_WIDTH, ROUND_TO, MARGIN)
    assert "--latency-ms" in str(err.value) and "\n" not in str(err.value)


# -- the trimming rule, with a deterministic fake clock ------------------------------------------------------
@pytest.fixture
def fake_clock():
    """A measurement (passed as `measure=`) by a known latency model: 'measured' = intercept + 0.05 ms per MMAC."""
    arch = small_arch()
    truth = hand_latency_model(arch, ms_per_mmac=0.05, intercept=0.01)
    calls = []

    def fake_measure(a, widths, settings, seed=0):
        ms = float(truth.predict(widths))
        calls.append(dict(widths))
        return Timing(
            "cpu",
            settings.batch,
            (settings.batch, *a.input_shape),
            settings.threads,
            settings.warmup,
            settings.runs,
            settings.percentile,
            ms * 0.9,
            ms,
            ms,
            ms,
            "fake",
        )

    return arch, truth, calls, fake_measure


def test_trims_the_stage_with_the_best_saving_per_relative_width(fake_clock):
    arch, truth, calls, fake = fake_clock
    start_ms = float(truth.predict(START))
    budget = 0.4 * start_ms
    res = fit(arch, START, budget, truth, FAST_LATENCY, MIN_WIDTH, ROUND_TO, MARGIN, measure=fake)
    _check_trims(START, res)
    limit = budget * (1 - MARGIN)
    assert res.measured_ms == pytest.approx(float(truth.predict(res.widths))) and res.measured_ms <= limit
    # it stops at the first network that fits: the one before the last trim did not
    assert res.trims and res.trims[-1]["measured_ms"] > limit
    assert len(calls) == len(res.trims) + 1
    # every trim picked the stage with the largest predicted saving per relative width lost
    widths = dict(START)
    for t in res.trims:
        base = float(truth.predict(widths))
        scores = {
            s: (base - float(truth.predict({**widths, s: w - ROUND_TO}))) * w / ROUND_TO
            for s, w in widths.items()
            if w - ROUND_TO >= MIN_WIDTH
        }
        assert scores[t["stage"]] == pytest.approx(max(scores.values()))
        widths[t["stage"]] = t["to"]


def test_respects_min_width_and_round_to(fake_clock):
    arch, truth, _, fake = fake_clock
    start = {"a": 12, "b": 60, "c": 100}
    floor_ish = float(truth.predict({"a": 12, "b": 12, "c": 12}))
    res = fit(arch, start, 1.5 * floor_ish, truth, FAST_LATENCY, min_width=12, round_to=4, margin=0.0, measure=fake)
    _check_trims(start, res, min_width=12, round_to=4)
    assert res.widths["a"] == 12  # already at min_width: never trimmed
    assert all(t["stage"] != "a" for t in res.trims)


def test_stops_after_max_trims_and_reports_what_it_measured(fake_clock):
    """max_trims bounds the work; the result then says honestly that it is still over the limit."""
    arch, truth, calls, fake = fake_clock
    budget = 0.3 * float(truth.predict(START))
    res = fit(arch, START, budget, truth, FAST_LATENCY, MIN_WIDTH, ROUND_TO, MARGIN, max_trims=2, measure=fake)
    assert len(res.trims) == 2
    _check_trims(START, res)
    assert res.measured_ms == pytest.approx(float(truth.predict(res.widths)))
    assert res.measured_ms > budget * (1 - MARGIN)
    calls.clear()
    res = fit(arch, START, budget, truth, FAST_LATENCY, MIN_WIDTH, ROUND_TO, MARGIN, max_trims=0, measure=fake)
    assert res.trims == [] and res.widths == START and len(calls) == 1  # max_trims=0: measure only


def test_margin_is_applied(fake_clock):
    arch, truth, _, fake = fake_clock
    ms = float(truth.predict(START))
    # exactly at the budget, a 3% margin forces trimming; without margin it passes untouched
    assert fit(arch, START, ms * 1.0001, truth, FAST_LATENCY, MIN_WIDTH, ROUND_TO, 0.0, measure=fake).trims == []
    assert fit(arch, START, ms * 1.0001, truth, FAST_LATENCY, MIN_WIDTH, ROUND_TO, 0.03, measure=fake).trims


def test_reporter_hears_every_trim(fake_clock):
    from flexslim.console import Reporter

    class Log(Reporter):
        def __init__(self):
            self.lines = []

        def log(self, line):
            self.lines.append(line)

    arch, truth, _, fake = fake_clock
    log = Log()
    res = fit(
        arch,
        START,
        0.5 * float(truth.predict(START)),
        truth,
        FAST_LATENCY,
        MIN_WIDTH,
        ROUND_TO,
        MARGIN,
        reporter=log,
        measure=fake,
    )
    assert len(log.lines) == len(res.trims) > 0
    assert all(line.startswith("trim: ") for line in log.lines)


def test_settings_are_passed_to_the_measurement(fake_clock):
    arch, truth, _, fake = fake_clock
    settings = dataclasses.replace(FAST_LATENCY, batch=3)
    res = fit(arch, START, 1000.0, truth, settings, MIN_WIDTH, ROUND_TO, MARGIN, measure=fake)
    assert res.trims == [] and res.p50_ms == pytest.approx(0.9 * res.measured_ms)


def test_round_to_budget_rounds_up_largest_fractions_first_within_the_target():
    from search_fixtures import hand_latency_model, small_arch

    from flexslim.trim import round_to_budget

    arch = small_arch()
    lat = hand_latency_model(arch)
    mus = {"a": 11.0, "b": 21.5, "c": 30.0}  # fractions of 8: a 3/8, b 5.5/8, c 6/8
    everything_up = {"a": 16, "b": 24, "c": 32}
    floors = {"a": 8, "b": 16, "c": 24}
    # a target that admits everything: all stages round up
    assert round_to_budget(mus, lat, float(lat.predict(everything_up)), 4, 8) == everything_up
    # a target at the floors: nothing rounds up
    assert round_to_budget(mus, lat, float(lat.predict(floors)), 4, 8) == floors
    # in between: c (largest fraction) first, then b, and a only if it still fits
    target = float(lat.predict({"a": 8, "b": 24, "c": 32}))
    got = round_to_budget(mus, lat, target, 4, 8)
    assert got == {"a": 8, "b": 24, "c": 32}
    assert float(lat.predict(got)) <= target
    # never below min_width (as GaussianMask.final_width), and a stage exactly on the grid stays there
    assert round_to_budget({"a": 2.0, "b": 16.0, "c": 24.0}, lat, 1e9, 4, 8) == {"a": 4, "b": 16, "c": 24}
