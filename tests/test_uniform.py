from __future__ import annotations

from search_fixtures import FAST_LATENCY, single_thread, small_arch  # noqa: F401

from flexslim.bench.uniform import scaled, uniform_scale
from flexslim.latency.budget import Budget


def test_scaled_rounds_and_respects_min_width():
    assert scaled({"a": 16, "b": 64}, 0.5, 4, 4) == {"a": 8, "b": 32}
    assert scaled({"a": 16, "b": 64}, 0.01, 4, 4) == {"a": 4, "b": 4}


def test_bisection_meets_a_budget_between_floor_and_start():
    from flexslim.latency.profiling import measure

    arch = small_arch()
    start = measure(arch, arch.widths, FAST_LATENCY).at_percentile_ms
    big = measure(arch, scaled(arch.widths, 3.0, 4, 4), FAST_LATENCY).at_percentile_ms
    budget = (start + big) / 2  # between the recipe widths and 3x: the multiplier must land above 1
    res = uniform_scale(arch, budget=Budget(budget), settings=FAST_LATENCY, min_width=4, round_to=4, iters=6)
    assert res.measured_ms <= budget
    assert res.multiplier > 0.5
    assert set(res.widths) == set(arch.widths)
