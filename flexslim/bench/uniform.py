"""Uniform width scaling baseline (WideResNet-style): one multiplier for every stage of the recipe,
picked by bisection on the MEASURED latency so the network meets the same budget."""

from __future__ import annotations

import time
from dataclasses import dataclass

from flexslim.latency.budget import Budget
from flexslim.models.arch import Arch
from flexslim.recipe.schema import LatencyConfig
from flexslim.search.bake import Measure
from flexslim.system.console import Reporter


@dataclass(frozen=True)
class UniformResult:
    """The fitted multiplier, its widths and measured latency, the bisection's time and number of networks measured."""

    multiplier: float
    widths: dict[str, int]
    measured_ms: float
    seconds: float
    probes: int


def scaled(widths: dict[str, int], m: float, min_width: int, round_to: int) -> dict[str, int]:
    """Every width times m, on the round_to grid, never below min_width."""
    return {s: max(min_width, round_to * round(w * m / round_to)) for s, w in widths.items()}


def uniform_scale(
    arch: Arch,
    *,
    budget: Budget,
    settings: LatencyConfig,
    min_width: int,
    round_to: int,
    iters: int = 8,
    measure: Measure | None = None,
    reporter: Reporter | None = None,
) -> UniformResult:
    """Largest multiplier m in [0, 4] of the recipe's widths whose scaled network MEASURES <= budget.limit_ms.

    Args:
        iters: bisection steps on m.
        measure: (arch, widths, settings) -> runtime.Timing (default: export and time on the runtime).
    """
    from flexslim.latency.profiling import measure as measure_on_runtime

    measure = measure or measure_on_runtime
    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    cache: dict[tuple, float] = {}

    def lat(m: float) -> tuple[dict[str, int], float]:
        w = scaled(arch.widths, m, min_width, round_to)
        key = tuple(sorted(w.items()))
        if key not in cache:
            cache[key] = measure(arch, w, settings).at_percentile_ms
            reporter.log(f"uniform x{m:.3f}: {w} -> {cache[key]:.4f} ms")
        return w, cache[key]

    lo, hi = 0.0, 4.0
    best = lat(lo)
    for _ in range(iters):
        mid = (lo + hi) / 2
        w, ms = lat(mid)
        if ms <= budget.limit_ms:
            lo, best = mid, (w, ms)
        else:
            hi = mid
    return UniformResult(lo, best[0], best[1], time.perf_counter() - t0, len(cache))
