"""After baking: measure the real network and trim widths until it meets the budget.

Each trim removes `round_to` channels from the stage with the largest predicted saving per unit of
relative width lost (a proxy for accuracy lost per millisecond: cutting 8 of 16 channels costs more
than 8 of 128), then re-measures. Every trim is recorded for the run log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flexslim.arch import Arch
from flexslim.budget import Budget
from flexslim.config import LatencyConfig
from flexslim.console import Reporter
from flexslim.errors import BadInput
from flexslim.latency import LatencyModel, measure
from flexslim.runtime import Timing


def round_to_budget(
    mus: dict[str, float], latency: LatencyModel, target_ms: float, min_width: int, round_to: int
) -> dict[str, int]:
    """Round each stage's searched mean to a multiple of `round_to` without wasting the budget.

    Nearest rounding of every stage alone ignores the budget: on narrow stages (mu 11 with round_to 8) it
    can give up a third of a stage, or overshoot. Here every stage starts at its floor multiple; stages
    are then rounded UP, largest fractional part first, while the predicted latency stays within
    `target_ms`. The measured check and trimming follow.
    """
    floor = {s: max(min_width, round_to * int(mu // round_to)) for s, mu in mus.items()}
    widths = dict(floor)
    for s in sorted(mus, key=lambda s: (mus[s] - floor[s]) / round_to, reverse=True):
        if mus[s] <= floor[s]:
            continue
        trial = {**widths, s: floor[s] + round_to}
        if float(latency.predict(trial)) <= target_ms:
            widths = trial
    return widths


@dataclass
class Fitted:
    """The widths fitted to the budget by measurement, with the last measurement and every trim made."""

    widths: dict[str, int]
    measured_ms: float  # the gate's statistic, last measurement
    p50_ms: float
    provider: str
    trims: list[dict] = field(default_factory=list)


Measure = Callable[[Arch, dict[str, int], LatencyConfig], Timing]


def fit_to_budget(
    arch: Arch,
    widths: dict[str, int],
    *,
    budget: Budget,
    latency: LatencyModel,
    settings: LatencyConfig,
    min_width: int,
    round_to: int,
    max_trims: int = 200,
    measure: Measure = measure,
    reporter: Reporter | None = None,
) -> Fitted:
    """Measure the network at `widths`; while it is over `budget.limit_ms`, trim `round_to` channels from the
    stage with the best predicted saving per relative width lost, and measure again.

    Args:
        latency: ranks the trims (prediction only; every verdict is a measurement).
        settings: the timing settings (provider, batch, threads, percentile) handed to `measure`.
        max_trims: 0 only measures.
        measure: (arch, widths, settings) -> runtime.Timing; the real one exports and times in the isolated
            timing process.

    Returns:
        Fitted. Raises BadInput when every stage is at min_width and the network is still over the limit.
    """
    reporter = reporter or Reporter()
    widths = dict(widths)
    trims: list[dict] = []
    while True:
        t = measure(arch, widths, settings)
        if t.at_percentile_ms <= budget.limit_ms or len(trims) >= max_trims:  # max_trims=0: just measure
            return Fitted(widths, t.at_percentile_ms, t.p50_ms, t.provider, trims)
        stage = _best_trim(widths, latency, min_width, round_to)
        if stage is None:
            raise BadInput(
                f"every stage is at min_width {min_width} and the network still measures "
                f"{t.at_percentile_ms:.4f} ms > {budget.limit_ms:.4f} ms; raise --latency-ms or lower model.min_width"
            )
        new = widths[stage] - round_to
        trims.append(
            {
                "stage": stage,
                "from": widths[stage],
                "to": new,
                "measured_ms": t.at_percentile_ms,
                "limit_ms": budget.limit_ms,
            }
        )
        reporter.log(
            f"trim: {stage} {widths[stage]} -> {new} (measured {t.at_percentile_ms:.4f} ms > {budget.limit_ms:.4f} ms)"
        )
        widths[stage] = new


def _best_trim(widths: dict[str, int], latency: LatencyModel, min_width: int, round_to: int) -> str | None:
    """The stage whose trim saves the most predicted time per relative width lost (None: all at min_width)."""
    choices = [s for s, w in widths.items() if w - round_to >= min_width]
    if not choices:
        return None
    base = float(latency.predict(widths))

    def score(stage: str) -> float:
        saved = base - float(latency.predict({**widths, stage: widths[stage] - round_to}))
        return saved / (round_to / widths[stage])

    return max(choices, key=score)
