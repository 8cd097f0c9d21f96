"""The timing statistic: the order-statistics interval of a percentile (an oracle: its coverage on distributions with
a known percentile) and the stopping rule against a fake clock with known noise."""

import math
import types

import numpy as np
import pytest

from flexslim.latency import statistic
from flexslim.latency.runtime import TimingPlan, _Passes, _timed_passes


@pytest.mark.parametrize(
    "draw, p90",
    [
        (lambda rng, n: rng.lognormal(0.0, 0.2, n), math.exp(0.2 * 1.2815516)),
        (lambda rng, n: rng.exponential(1.0, n), math.log(10.0)),
        (lambda rng, n: rng.uniform(1.0, 2.0, n), 1.9),
    ],
)
@pytest.mark.parametrize("n", [60, 400])
def test_the_interval_covers_the_true_percentile_95_times_in_100(draw, p90, n):
    rng = np.random.default_rng(0)
    trials = 2000
    hits = 0
    for _ in range(trials):
        lo, hi = statistic.percentile_interval(draw(rng, n), 90.0)
        hits += lo <= p90 <= hi
    assert 0.93 <= hits / trials <= 0.985  # 95% nominal; the binomial's discreteness makes it a little conservative


def test_too_few_passes_have_no_interval_and_the_interval_narrows_with_more():
    rng = np.random.default_rng(1)
    assert statistic.percentile_interval(rng.normal(1, 0.01, 8), 90.0) is None
    assert statistic.percentile_interval([], 90.0) is None
    widths = [statistic.relative_halfwidth(rng.lognormal(0, 0.1, n), 90.0) for n in (50, 200, 800, 3200)]
    assert widths == sorted(widths, reverse=True) and widths[-1] < 0.3 * widths[0]


def test_known_reads_the_undisturbed_windows_only():
    rng = np.random.default_rng(2)
    quiet = list(1.0 + 0.001 * rng.standard_normal(400))
    disturbed = quiet[:200] + [1.5 + 0.3 * rng.random() for _ in range(40)] + quiet[200:]  # 40 slow passes in a row
    assert statistic.known(quiet, 90.0, 0.01)
    assert statistic.known(disturbed, 90.0, 0.01)  # their windows are left out, as the figures leave them out
    assert not statistic.known(quiet, 90.0, 0.0)  # precision 0: never known early


class FakeClock:
    """Seconds that move only when a fake pass runs: pass durations drawn from a known distribution."""

    def __init__(self, draw):
        self.t, self.draw, self.passes = 0.0, draw, 0

    def __call__(self) -> float:
        return self.t

    def run(self) -> None:
        self.t += self.draw()
        self.passes += 1


def _timed(draw, precision: float, min_seconds: float = 2.0, runs: int = 50):
    clock = FakeClock(draw)
    plan = TimingPlan(batch=1, warmup=0, runs=runs, min_seconds=min_seconds, precision=precision)
    passes = _Passes(clock.run, types.SimpleNamespace(terminate=False), "cpu", plan, clock=clock)
    samples, why = _timed_passes(passes, plan)
    return samples, why, clock.t


def test_a_quiet_timer_stops_early_once_the_percentile_is_known():
    rng = np.random.default_rng(3)
    samples, why, seconds = _timed(lambda: 0.002 * (1 + 0.003 * rng.standard_normal()), precision=0.01)
    assert why == "known"
    assert statistic.EARLIEST * 2.0 <= seconds < 0.3 * 2.0  # the floor, then stopped long before the 2 s
    half = statistic.relative_halfwidth(statistic.undisturbed(samples)[0], 90.0)
    assert half is not None and half <= 0.01


def test_a_noisy_timer_runs_to_its_full_seconds():
    rng = np.random.default_rng(4)
    samples, why, seconds = _timed(lambda: 0.002 * rng.lognormal(0.0, 0.5), precision=0.01)
    assert why is None and seconds >= 2.0  # +-1% on the p90 of passes that spread 50% is out of reach in 2 s
    assert statistic.relative_halfwidth(samples, 90.0) > 0.01


def test_without_a_precision_a_quiet_timer_runs_its_full_seconds_too():
    rng = np.random.default_rng(5)
    _, why, seconds = _timed(lambda: 0.002 * (1 + 0.003 * rng.standard_normal()), precision=0.0)
    assert why is None and seconds >= 2.0


def test_the_minimum_passes_come_first_even_when_known_sooner():
    rng = np.random.default_rng(6)
    samples, why, _ = _timed(
        lambda: 0.0001 * (1 + 0.001 * rng.standard_normal()), precision=0.01, runs=3000, min_seconds=1.0
    )
    assert (
        why == "known" and len(samples) == 3000
    )  # known long before (and past the 0.25 s floor), checked once the 3000 passes are in
