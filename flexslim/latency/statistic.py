"""The timing statistic: which timed passes count (the undisturbed windows), how well their percentile is known (a
distribution-free confidence interval from order statistics) and when a measurement may stop because it knows.

Undisturbed passes: the timed passes are cut into consecutive windows (up to MAX_WINDOWS, at least WINDOW_PASSES
passes each); a window whose median pass is more than 3% slower than the quietest window's was disturbed by something
else on the machine (the quietest quarter of the windows is kept whatever their spread). Measured on a shared 2-core
VM: 6-34% of 1 s stretches run 5-60% slow for seconds at a time, the network unchanged. The percentile is read over
the passes of the undisturbed windows, so the same network gives the same number from run to run.

How well it is known: for the q-quantile of n passes, the number of passes below the true quantile is
Binomial(n, q), so the order statistics of ranks n q -/+ z sqrt(n q (1 - q)) bracket it with confidence CONFIDENCE
whatever the distribution of the passes (normal approximation of the binomial; no interval when a rank falls
outside the passes). `percentile_interval` gives that interval over the undisturbed passes.

Stopping when it knows (`latency.precision`, validate `--precision`): a session that has timed its `runs` passes and
at least EARLIEST of its seconds stops as soon as the interval is within +-precision of the percentile (`known`);
else it runs its full seconds, as without a precision. A precision never makes a measurement longer.
"""

from __future__ import annotations

import math

GATE_SECONDS = 2.0  # seconds of timed passes in one gate measurement (validate's default --min-seconds)
QUIET = 1.03  # a window whose median pass is within 3% of the quietest window's median is undisturbed
WINDOW_PASSES = 10  # at least this many passes per window ...
MAX_WINDOWS = 20  # ... and at most this many windows
MIN_KEPT = 0.25  # whatever the jitter, the figures come from at least the quietest quarter of the windows
CONFIDENCE = 0.95  # of the percentile's interval
_Z = 1.959964  # the standard normal's two-sided 95% point
EARLIEST = 0.25  # with a precision, a session may stop once this fraction of its seconds has passed
MIN_RANKS = 1  # the interval's ranks must lie inside the passes (1 .. n)


def relative_spread(median: float, sessions) -> float | None:
    """Largest relative deviation of one session's figure from their median (None with fewer than two)."""
    if len(sessions) < 2:
        return None
    return max(abs(v - median) for v in sessions) / median


def undisturbed(samples) -> tuple:
    """(the passes of the undisturbed windows, number of windows, number kept): see the module docstring.
    At least the quietest quarter of the windows is kept (a tiny graph's window medians jitter by more than
    3% on a quiet machine: the figures never rest on one lucky window). Fewer than 2 x WINDOW_PASSES passes
    make one window, kept whole."""
    import numpy as np

    arr = np.asarray(samples, dtype=float)
    k = max(1, min(MAX_WINDOWS, len(arr) // WINDOW_PASSES))
    chunks = np.array_split(arr, k)
    medians = [float(np.median(c)) for c in chunks]
    calm = min(medians)
    floor = sorted(medians)[math.ceil(MIN_KEPT * k) - 1]  # the quietest quarter is always kept
    kept = [c for c, m in zip(chunks, medians) if m <= max(QUIET * calm, floor)]
    return np.concatenate(kept), k, len(kept)


def percentile_interval(passes, percentile: float) -> tuple[float, float] | None:
    """The CONFIDENCE interval (low, high) of the `percentile` of the distribution `passes` are drawn from, from
    their order statistics; None when there are too few passes to bracket it (see the module docstring)."""
    import numpy as np

    x = np.sort(np.asarray(passes, dtype=float))
    n, q = len(x), percentile / 100.0
    if n == 0 or not 0.0 < q < 1.0:
        return None
    half = _Z * math.sqrt(n * q * (1.0 - q))
    low, high = math.floor(n * q - half), math.ceil(n * q + half)  # 1-based ranks
    if low < MIN_RANKS or high > n:
        return None
    return float(x[low - 1]), float(x[high - 1])


def relative_halfwidth(passes, percentile: float) -> float | None:
    """The interval's larger half around the percentile of `passes`, relative to it (None: no interval)."""
    import numpy as np

    ci = percentile_interval(passes, percentile)
    if ci is None:
        return None
    value = float(np.percentile(passes, percentile))
    if value <= 0:
        return None
    return max(value - ci[0], ci[1] - value) / value


def known(samples, percentile: float, precision: float) -> bool:
    """True when the percentile of the undisturbed windows' passes of `samples` is known within +-`precision`."""
    if precision <= 0 or len(samples) < 2 * WINDOW_PASSES:
        return False
    half = relative_halfwidth(undisturbed(samples)[0], percentile)
    return half is not None and half <= precision
