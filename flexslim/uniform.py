"""Uniform width scaling baseline (WideResNet-style): one multiplier for every stage of the recipe,
picked by bisection on the MEASURED latency so the network meets the same budget."""

from __future__ import annotations

import time
from dataclasses import dataclass

from flexslim.arch import Arch
from flexslim.config import LatencyConfig
from flexslim.console import Reporter


@dataclass(frozen=True)
class UniformResult:
    multiplier: float
    widths: dict[str, int]
    measured_ms: float
    seconds: float
    probes: int


def scaled(widths: dict[str, int], m: float, min_width: int, round_to: int) -> dict[str, int]:
    return {s: max(min_width, round_to * round(w * m / round_to)) for s, w in widths.items()}


def uniform_scale(
    arch: Arch,
    budget_ms: float,
    settings: LatencyConfig,
    min_width: int,
    round_to: int,
    margin: float = 0.03,
    iters: int = 8,
    reporter: Reporter | None = None,
) -> UniformResult:
    """Largest multiplier m in [0, 4] whose scaled network measures <= budget * (1 - margin)."""
    from flexslim.latency import measure

    reporter = reporter or Reporter()
    limit = budget_ms * (1.0 - margin)
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
        if ms <= limit:
            lo, best = mid, (w, ms)
        else:
            hi = mid
    return UniformResult(lo, best[0], best[1], time.perf_counter() - t0, len(cache))
