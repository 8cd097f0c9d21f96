"""The bake's measuring desk: every network the bake times (in full, as the gate times), screens (at the latency
model's timing, to rank) and times again, each logged as a step with its prediction and score; what it measured,
so that no network is timed twice; and the contracts of what measures (`Measure`) and what scores (`Score`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Protocol

from flexslim.latency import rechecks
from flexslim.latency.cache import refreshing
from flexslim.latency.model import LatencyModel
from flexslim.latency.runtime import Timing
from flexslim.models.arch import Arch
from flexslim.recipe.schema import LatencyConfig

OUTLIER = 1.3  # a measurement this far over the prediction is repeated once (the lower of the two is kept)
RETIME = 1.10  # a growth measured over the limit and this far over its bias-corrected prediction: timed once more
DRIFT = 0.02  # a confirmation this far from the figure its network was chosen on: the machine moved (`Desk.confirm`)


Measure = Callable[[Arch, dict[str, int], LatencyConfig], Timing]


class Score(Protocol):
    """What a network at `widths` can do (higher is better), and the noise of that figure."""

    def __call__(self, widths: dict[str, int]) -> float:
        """The score of the network at `widths` (e.g. D_s accuracy of the supernet sliced to them)."""
        ...

    def noise(self, value: float) -> float:
        """How far two scores may differ by chance alone near `value`."""
        ...


class Desk:
    """The bake's measuring desk: measures, logs each step, remembers what it measured (no network twice)."""

    def __init__(self, arch: Arch, settings: LatencyConfig, latency: LatencyModel, measure_fn: Measure, reporter):
        self.arch, self.settings, self.latency = arch, settings, latency
        self.measure_fn, self.reporter = measure_fn, reporter
        self.score: Score | None = None
        self.quick: LatencyConfig | None = None  # the screens' settings (the latency model's), when steps are screened
        self.screen_out = 0.0  # ... and how far over the limit a screen rejects (see `bake._screened_over`)
        self.screened_out: set[tuple] = set()  # networks a screen rejected: not screened or timed again
        self.cache: dict[tuple, Timing] = {}
        self.steps: list[dict] = []
        self.screens: list[dict] = []
        self.screened: dict[tuple, Timing] = {}  # predictions may use them (`_from_measured`), verdicts never
        self.device = ""  # the measuring device's fingerprint id: its re-timings are recorded (`latency.rechecks`)
        self.verdict: LatencyConfig | None = None  # what `confirm` times with (the gate's own timing); None: settings
        self.moved = False  # a confirmation found the machine moved (more than DRIFT): the latency cache is not read
        self.scale: dict[tuple, float] = {}  # per network timed before a move: how far the machine moved since
        #  (stale: timed again when a step asks for it)
        self.stale_screens: set[tuple] = set()  # networks screened out before a move: screened again if asked

    def screen(self, widths: dict[str, int], settings: LatencyConfig) -> Timing:
        """`widths` timed with `settings` (the latency model's: shorter sessions that may stop early, often in the
        latency cache already) to rank candidates; logged in `screens`, never a verdict, never in `cache`."""
        t = self._measure(widths, settings)
        self.stale_screens.discard(key := tuple(sorted(widths.items())))
        self.screened[key] = t
        pred = float(self.latency.predict(widths))
        self.screens.append({"widths": dict(widths), "predicted_ms": pred, "measured_ms": t.at_percentile_ms})
        self.reporter.log(f"bake screen: {widths} predicted {pred:.4f} ms, screened {t.at_percentile_ms:.4f} ms")
        return t

    def spread(self) -> float | None:
        """Median session-to-session spread of the networks measured so far (None: no session figures)."""
        spreads = [s for t in self.cache.values() if (s := t.spread()) is not None]
        return statistics.median(spreads) if spreads else None

    def __call__(self, widths: dict[str, int], step: str) -> Timing:
        key = tuple(sorted(widths.items()))
        pred = float(self.latency.predict(widths))
        if key in self.scale:  # timed before the machine moved: timed again, the new figure kept
            first, t = self._fresh(widths)
            record = {"step": step, "widths": dict(widths), "predicted_ms": pred, "measured_ms": t.at_percentile_ms,
                      "retimed": True, "first_ms": first.at_percentile_ms, **how_known(t)}  # fmt: skip
            return self._logged(record, t)
        if key not in self.cache:
            t = self._measure(widths, self.settings)
            if t.at_percentile_ms > OUTLIER * pred:  # far over the model: time it once more, keep the lower
                with refreshing():  # (interference only adds time) a timing, not the latency cache's copy of `t`
                    again = self.measure_fn(self.arch, dict(widths), self.settings)
                t = min(t, again, key=lambda x: x.at_percentile_ms)
            self.cache[key] = t
        t = self.cache[key]
        record = {"step": step, "widths": dict(widths), "predicted_ms": pred, "measured_ms": t.at_percentile_ms,
                  **how_known(t)}  # fmt: skip
        return self._logged(record, t)

    def _logged(self, record: dict, t: Timing) -> Timing:
        """`record` (a step, its score added when there is a score) logged in `steps` and reported -> `t`."""
        widths, scored = record["widths"], ""
        if self.score is not None:
            record["score"] = self.score(dict(widths))
            scored = f", supernet D_s accuracy {record['score']:.4f}"
        self.steps.append(record)
        again = f" (timed again: the machine moved; first {record['first_ms']:.4f})" if record.get("retimed") else ""
        self.reporter.log(
            f"bake {record['step']}: {widths} predicted {record['predicted_ms']:.4f} ms, measured "
            f"{record['measured_ms']:.4f} ms{again}{scored}"
        )
        return t

    def _measure(self, widths: dict[str, int], settings: LatencyConfig) -> Timing:
        """`widths` timed with `settings`; once a confirmation found the machine moved, never read from the latency
        cache (its entries were timed before the move, like the desk's scaled ones)."""
        if not self.moved:
            return self.measure_fn(self.arch, dict(widths), settings)
        with refreshing():
            return self.measure_fn(self.arch, dict(widths), settings)

    def figure(self, widths: dict[str, int]) -> float | None:
        """What `widths` would measure now by what the desk knows: its timing in full, scaled by how far the machine
        moved since it was taken (`scale`: confirmations that moved by more than DRIFT) (None: not timed in full)."""
        key = tuple(sorted(widths.items()))
        if key not in self.cache:
            return None
        return self.cache[key].at_percentile_ms * self.scale.get(key, 1.0)

    def retime(self, widths: dict[str, int]) -> Timing:
        """`widths` timed once more (not read back from the latency cache); the new timing is the figure from now on.

        A network is timed again because its first figure was high (over the limit, or far over what the measured
        start predicts): that figure was chosen for its value, the new one was not. Keeping the lower of the two (as
        before 2026-12) biased every retimed network low."""
        first, t = self._fresh(widths)
        step = next(s for s in reversed(self.steps) if s["widths"] == dict(widths))
        step.update(measured_ms=t.at_percentile_ms, retimed=True, first_ms=first.at_percentile_ms, **how_known(t))
        self.reporter.log(
            f"bake re-timed: {widths} measured {t.at_percentile_ms:.4f} ms (first {first.at_percentile_ms:.4f})"
        )
        return t

    def confirm(self, widths: dict[str, int]) -> Timing:
        """The delivered network timed once more, fresh, as its verdict (with `verdict`: as the gate times it): of
        every network the bake measured it is the one whose figure came in under the limit, so that figure is the
        lowest of many chances (a winner's curse); a timing taken after the choice is not. Logged as a "confirm"
        step (`first_ms`: the figure it was chosen on); the new timing replaces the cached one.

        A fresh figure more than DRIFT from its figure as of now (the first, scaled by any earlier move) says the
        machine moved since (this 2-core VM: by 5-15% between
        minutes): every other figure the desk holds is then stale - scaled by the move where a move decides
        (`figure`), timed again where a step asks for it - and nothing more is read from the latency cache. At 4 x
        the fashion floor 16/48/80/176 was chosen at 0.1961 ms and confirmed at 0.1801, under the window; its growth
        16/48/80/192 had measured 0.2085 (over the 0.2018 limit) on the slower machine and was never tried again,
        and its other growth came out of the latency cache at 0.2019."""
        expected = self.figure(widths)  # its figure as of now (scaled by any earlier move)
        first, t = self._fresh(widths, self.verdict)
        ratio = t.at_percentile_ms / max(expected or first.at_percentile_ms, 1e-12)
        if abs(ratio - 1) > DRIFT:
            key = tuple(sorted(widths.items()))
            self.moved = True
            for other in set(self.cache) - {key}:
                self.scale[other] = self.scale.get(other, 1.0) * ratio
            self.stale_screens |= self.screened_out - {key}
        pred = float(self.latency.predict(widths))
        self.steps.append(
            {"step": "confirm", "widths": dict(widths), "predicted_ms": pred, "measured_ms": t.at_percentile_ms,
             "first_ms": first.at_percentile_ms, **how_known(t)}
        )  # fmt: skip
        self.reporter.log(
            f"bake confirm: {widths} measured {t.at_percentile_ms:.4f} ms (chosen at {first.at_percentile_ms:.4f})"
        )
        return t

    def _fresh(self, widths: dict[str, int], settings: LatencyConfig | None = None) -> tuple[Timing, Timing]:
        """(the cached timing of `widths`, a new one taken now with `settings` (default: the desk's) - never the
        latency cache's copy), the new one cached; the pair is recorded as one of this device's re-timings (the
        headroom's measured floor)."""
        key = tuple(sorted(widths.items()))
        first = self.cache[key]
        with refreshing():
            t = self.cache[key] = self.measure_fn(self.arch, dict(widths), settings or self.settings)
        self.scale.pop(key, None)
        if self.device:
            rechecks.record(self.device, first.at_percentile_ms, t.at_percentile_ms, "bake")
        return first, t

    def better(self, new: dict[str, int], old: dict[str, int]) -> bool:
        """True without a score; else when `new` scores no worse than `old` beyond the score's noise."""
        if self.score is None:
            return True
        before = self.score(old)
        return self.score(new) >= before - self.score.noise(before)


def how_known(t: Timing) -> dict:
    """How well a bake step's figure is known, for run.json: `known` (its sessions stopped once the percentile was
    within +-`precision`, else they timed their full seconds), `interval_ms` (the median session's 95% interval from
    order statistics; None: too few passes) and `sessions_ms` (each session's percentile)."""
    interval = [t.ci_low_ms, t.ci_high_ms] if t.ci_low_ms is not None and t.ci_high_ms is not None else None
    return {"known": bool(t.known), "precision": t.precision, "interval_ms": interval, "sessions_ms": list(t.sessions)}


PREDICTED = "predicted by the latency table (not measured)"  # the `runtime` of a predicted_by Timing


def predicted_by(latency: LatencyModel) -> Measure:
    """A Measure that reads the latency table instead of timing: for a table measured on another device than the
    one this job can measure on (no timer for it), so nothing measured here decides. Its Timings say so in
    `runtime` (PREDICTED) and have no timed passes."""
    from flexslim.latency.runtime import Timing

    def measure(arch: Arch, widths: dict[str, int], settings: LatencyConfig) -> Timing:
        ms = float(latency.predict(widths))
        s = settings
        shape = (s.batch, *arch.input_shape)
        return Timing(latency.provider, s.batch, shape, s.threads, 0, 0, s.percentile, ms, ms, ms, ms, PREDICTED)

    return measure
