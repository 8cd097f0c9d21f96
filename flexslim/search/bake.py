"""The measured bake: from the searched (averaged) widths to the network that is delivered.

1. choose   every stage's searched width rounded down or up to the grid (all combinations for a few stages, a
            beam over the stages for many), ranked by the latency model: the most latency under the limit first;
2. measure  the best few, screened as the latency model times (its shorter, early-stopping sessions, often already
            in the latency cache); the one the screen ranks first (see `_chosen`) is then timed as the gate times it:
            `repeats` sessions of the gate's GATE_SECONDS each, in full (shorter sessions read 1-2% low here), and
            the spread of those sessions sets the headroom under the budget from here on (`confidence` spreads, see
            budget.py). Every later step is timed as the gate times it;
3. trim     while over the limit: `grid` channels off the stage with the best predicted saving per relative width;
4. fill     while a stage can grow: the most relative width per predicted millisecond first (predictions scaled
            by measured / predicted of the current network: the model's local bias, and up to TOLERANCE over the
            limit, the model's own error), kept when it MEASURES within the limit; still below the window (or
            within the headroom above its bottom), exchange grid steps of width between stages (every stage at
            once for a few stages: 16/32/64 -> 8/48/48). A growth or exchange is screened first (the latency
            model's timing): one that screens more than `screen_out` over the limit is rejected without its
            gate-length timing (screens only ever reject; a network is kept on a gate-length timing alone);
5. report   whether the result lands in the budget's window [low, ms], and otherwise the two neighbouring networks
            that straddle it, with their measured latencies.

With a `score` (the searched supernet's D_s accuracy at given widths, `search.capability.SupernetScore`),
capability decides the choice: the searched widths rounded to nearest are screened too, and among the measured
choices within the limit the best-scoring is kept (not the one that uses most latency; the fill then brings it into
the window), and an exchange is kept only when it costs no score beyond the score's noise (one that already scores
worse is not measured at all).

Every latency verdict is a measurement (the latency model only ranks), and every gate-length measurement is logged
in `Fitted.steps` (with its score, when there is one; the screens in `Fitted.screens`). The default `measure` reads
the latency cache first (entries at least as thorough as the bake's gate-length sessions: the latency model's
shorter timings never answer it).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, replace

from flexslim.errors import BadInput
from flexslim.latency.budget import Budget
from flexslim.latency.model import LatencyModel
from flexslim.latency.profiling import measure
from flexslim.latency.runtime import GATE_SECONDS, Timing
from flexslim.models.arch import Arch
from flexslim.recipe.schema import LatencyConfig
from flexslim.search.desk import RETIME, Desk, Measure, Score
from flexslim.system.console import Reporter

ENUMERATE_UP_TO = 10  # stages; more than that: a beam over the stages
BEAM = 32
MEASURE_FIRST = 3  # rounded neighbours measured before trimming or filling
EXCHANGE_ALL = 6  # stages: up to this many, exchanges may move every stage at once (3^n networks)
EXCHANGES = 4  # at most this many width exchanges measured when the fill ends below the window
TOLERANCE = 0.04  # growths predicted up to this far over the limit are still measured (hold-out error near budgets)
SCREEN_OUT = 0.05  # a growth or exchange screened this far over the limit is rejected without its gate-length timing
BORDERLINE = 0.02  # a growth or exchange measured at most this far over the limit is timed once more (lower kept)


@dataclass
class Fitted:
    """The delivered widths, their last measurement, and every step of the bake.

    `steps`: {"step": choose | trim | grow | grow-rejected | exchange, "widths", "predicted_ms", "measured_ms"};
    `trims`: the trims alone ({"stage", "from", "to", "measured_ms", "limit_ms"}); `note`: why the network lands
    below the window, when it does.
    """

    widths: dict[str, int]
    measured_ms: float  # the gate's statistic, last measurement of `widths`
    p50_ms: float
    provider: str
    trims: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    screens: list[dict] = field(default_factory=list)  # the rounded neighbours at the latency model's timing
    note: str = ""
    seconds: float = 0.0  # wall time of the bake's measurements
    budget: Budget | None = None  # the budget the result was judged against (headroom from the bake's own spread)

    @property
    def measurements(self) -> int:
        """How many networks the bake measured."""
        return len(self.steps)


def rounded_neighbours(
    centers: dict[str, float], grid: int, min_width: int, latency: LatencyModel, limit_ms: float
) -> list[dict[str, int]]:
    """Each stage's width rounded down and up to the grid (never below min_width), combined over the stages: all
    combinations for up to ENUMERATE_UP_TO stages, else a beam of BEAM partial choices ranked by the prediction of
    their completion (the remaining stages rounded to nearest). Sorted best first: predicted within `limit_ms` and
    highest, then the rest lowest first."""
    opts = {s: _down_and_up(c, grid, min_width) for s, c in centers.items()}
    stages = list(opts)
    if len(stages) <= ENUMERATE_UP_TO:
        combos = [dict(zip(stages, ws)) for ws in itertools.product(*(opts[s] for s in stages))]
    else:
        nearest = {s: min(opts[s], key=lambda w: abs(w - centers[s])) for s in stages}
        beam: list[dict] = [{}]
        for s in stages:
            grown = [{**b, s: w} for b in beam for w in opts[s]]
            beam = sorted(grown, key=lambda b: _rank(float(latency.predict({**nearest, **b})), limit_ms))[:BEAM]
        combos = beam
    return sorted(combos, key=lambda w: _rank(float(latency.predict(w)), limit_ms))


def nearest_rounding(centers: dict[str, float], grid: int, min_width: int) -> dict[str, int]:
    """Each stage's searched width rounded to the nearest grid width (min_width counts as one, even under the grid;
    a tie rounds up)."""
    return {s: min(reversed(_down_and_up(c, grid, min_width)), key=lambda w: abs(w - c)) for s, c in centers.items()}


def _down_and_up(c: float, grid: int, min_width: int) -> list[int]:
    """A searched width rounded down and up to the grid, never below min_width (one value when they coincide)."""
    return sorted({max(min_width, grid * math.floor(c / grid)), max(min_width, grid * math.ceil(c / grid))})


def step_up(w: int, grid: int) -> int:
    """The next deliverable width above `w`: the next grid multiple (8 -> 16 and 24 -> 32 on a 16-grid, never 24 or
    40, which a 16-channel block charges as 32 and 48)."""
    return grid * (w // grid) + grid


def step_down(w: int, grid: int, min_width: int) -> int:
    """The next deliverable width below `w`: the grid multiple under it, or min_width (32 -> 16 -> 8 on a 16-grid
    with min_width 8; never 24)."""
    return max(min_width, grid * math.ceil(w / grid) - grid)


def _rank(pred: float, limit: float) -> tuple:
    return (0, -pred) if pred <= limit else (1, pred)


@dataclass(frozen=True)
class BakePlan:
    """How the bake works: what it times with, the grid it moves on, and how much it may measure.

    Attributes:
        settings: what `measure` times (provider, batch, threads, percentile, repeats).
        min_width: the floor of every stage; grid: the width grid (round_to).
        fit: trim and fill by measurement; False measures the best rounded neighbour only (the bench's "no bake").
        max_measures: the most networks measured (the first MEASURE_FIRST included).
        confidence: with it, the headroom becomes `confidence` x the spread of the bake's own sessions once the
            first networks are measured (None: the budget as given).
        session_seconds: timed seconds per session (the gate's); `settings.repeats` sessions per network.
        screen_out: a growth or exchange whose screen (the latency model's timing: a fraction of a gate-length one)
            reads more than this fraction over the limit is rejected unmeasured in full (None: every one in full).
            Screens read ~1% under the gate and scatter more, so 5% over is over; only rejections are screened.

    Example::

        BakePlan.for_recipe(recipe)   # the search job's bake: the recipe's latency settings, grid and trim
    """

    settings: LatencyConfig
    min_width: int
    grid: int
    fit: bool = True
    max_measures: int = 16
    confidence: float | None = None
    session_seconds: float = GATE_SECONDS
    screen_out: float | None = SCREEN_OUT

    @classmethod
    def for_recipe(cls, recipe) -> BakePlan:
        """The plan a recipe asks for (`search.trim` decides `fit`)."""
        return cls(
            recipe.latency,
            recipe.model.min_width,
            recipe.model.round_to,
            fit=recipe.search.trim,
            confidence=recipe.latency.confidence,
            session_seconds=recipe.latency.bake_seconds,
        )


def bake(
    arch: Arch,
    centers: dict[str, float],
    *,
    budget: Budget,
    latency: LatencyModel,
    plan: BakePlan,
    measure: Measure = measure,
    reporter: Reporter | None = None,
    score: Score | None = None,
) -> Fitted:
    """The delivered widths for searched widths `centers` (channels, e.g. mu averaged over the end of the search).

    Args:
        budget: the measured limit (`limit_ms`) and the window [`low_ms`, `ms`] the result should land in.
        latency: ranks choices (prediction only).
        plan: settings, grid, floor and measuring allowance (BakePlan).
        measure: (arch, widths, settings) -> runtime.Timing; tests pass a fake clock.
        score: what a candidate can do (see `Score`); None ranks by latency alone.

    Returns:
        Fitted, whose `budget` is the one the result was judged against (re-fitted to the bake's own sessions when
        `plan.confidence` is given). Raises BadInput when every stage is at min_width and the network still
        measures over the limit.
    """
    settings, min_width, grid, fit, max_measures = plan.settings, plan.min_width, plan.grid, plan.fit, plan.max_measures
    confidence, session_seconds = plan.confidence, plan.session_seconds
    t0 = time.perf_counter()
    # timed as the gate times, in full (no early stop: sessions cut short read ~1% lower than the gate's 2 s, measured)
    gate_like = replace(settings, min_seconds=session_seconds * max(1, settings.repeats), precision=0.0)
    desk = Desk(arch, gate_like, latency, measure, reporter or Reporter())
    desk.score = score
    desk.quick = settings if plan.screen_out is not None else None
    desk.screen_out = plan.screen_out or 0.0
    choices = rounded_neighbours(centers, grid, min_width, latency, budget.limit_ms)[: MEASURE_FIRST if fit else 1]
    near = nearest_rounding(centers, grid, min_width)
    if fit and score is not None and near not in choices and latency.predict(near) <= budget.limit_ms * (1 + TOLERANCE):
        choices.append(near)  # what the search found, rounded: screened whatever the latency it leaves unused
    if len(choices) > 1:  # ranked by a screen at the latency model's timing; the first is then timed in full
        first, _ = _chosen([(w, desk.screen(w, settings)) for w in choices], budget, score)
        choices = [first]
    timed = [(w, desk(w, "choose")) for w in choices]
    if confidence is not None and (spread := desk.spread()) is not None:
        budget = budget.refit(spread, confidence)
    widths, t = _chosen(timed, budget, score)
    trims: list[dict] = []
    if fit:
        widths, t, trims = _trim(widths, t, desk, budget, min_width, grid, max_measures)
        widths, t = _fill(widths, t, desk, budget, grid, max_measures)
        widths, t = _exchange(widths, t, desk, budget, min_width, grid, max_measures)
    fitted = Fitted(
        dict(widths), t.at_percentile_ms, t.p50_ms, t.provider, trims, desk.steps, desk.screens, budget=budget
    )
    fitted.note = _window_note(fitted, desk, budget) if fit else ""
    fitted.seconds = time.perf_counter() - t0
    return fitted


def _chosen(timed: list[tuple[dict, Timing]], budget: Budget, score: Score | None) -> tuple[dict, Timing]:
    """Of the measured choices: within the limit the best-scoring (among equal scores, or without a score, the one
    using most latency: the fill and the exchanges then bring it into the window); else the lowest over it.

    Capability decides before the window does: at 1.5 x the floor of the fashion recipe the choice the window
    preferred (16/8/32/64, in it at 0.958 x, supernet score 0.43) retrained 1.1 points below uniform scaling's
    16/16/32/64, while the searched widths rounded (8/16/32/80, 0.85 x before the fill) had been passed over."""
    ms = lambda wt: wt[1].at_percentile_ms  # noqa: E731
    within = [wt for wt in timed if ms(wt) <= budget.limit_ms]
    if within and score is not None:
        return max(within, key=lambda wt: (score(wt[0]), ms(wt)))
    return max(within, key=ms) if within else min(timed, key=ms)


def _trim(widths, t: Timing, desk: Desk, budget: Budget, min_width: int, grid: int, max_measures: int):
    trims: list[dict] = []
    while t.at_percentile_ms > budget.limit_ms and len(desk.steps) < max_measures:
        stage = _best_trim(widths, desk.latency, min_width, grid)
        if stage is None:
            raise BadInput(
                f"every stage is at min_width {min_width} and the network still measures "
                f"{t.at_percentile_ms:.4f} ms > {budget.limit_ms:.4f} ms; raise --latency-ms or lower model.min_width"
            )
        new = step_down(widths[stage], grid, min_width)
        trims.append(
            {
                "stage": stage,
                "from": widths[stage],
                "to": new,
                "measured_ms": t.at_percentile_ms,
                "limit_ms": budget.limit_ms,
            }
        )
        widths = {**widths, stage: new}
        t = desk(widths, "trim")
    return widths, t, trims


def _best_trim(widths: dict[str, int], latency: LatencyModel, min_width: int, grid: int) -> str | None:
    """The stage whose trim saves the most predicted time per relative width lost (None: all at min_width)."""
    choices = [s for s, w in widths.items() if w > min_width]
    if not choices:
        return None
    base = float(latency.predict(widths))

    def score(stage: str) -> float:
        new = step_down(widths[stage], grid, min_width)
        saved = base - float(latency.predict({**widths, stage: new}))
        return saved / ((widths[stage] - new) / widths[stage])

    return max(choices, key=score)


def _fill(widths, t: Timing, desk: Desk, budget: Budget, grid: int, max_measures: int):
    """Grow stages while they measure within the limit: the most relative width per predicted ms first; a stage
    whose growth measured over the limit is not tried again - after one more timing when it measured RETIME over what
    the current network's measurement predicts for it (a slow stretch of the machine rejected good growths)."""
    blocked: set[str] = set()
    while len(desk.steps) < max_measures:
        base = float(desk.latency.predict(widths))
        local = t.at_percentile_ms / base  # the model's bias here, by measurement: predictions are scaled by it
        options = []
        for s, w in widths.items():
            grown = {**widths, s: step_up(w, grid)}
            pred = float(desk.latency.predict(grown))
            if s not in blocked and pred * local <= budget.limit_ms * (1 + TOLERANCE):
                options.append(((grown[s] - w) / w / max(pred - base, 1e-9), s, grown))
        if not options:
            return widths, t
        _, stage, grown = max(options, key=lambda o: o[0])
        expected = local * float(desk.latency.predict(grown))
        if _screened_over(desk, grown, budget, expected):
            blocked.add(stage)
            continue
        tg = desk(grown, "grow")
        if budget.limit_ms < tg.at_percentile_ms and tg.at_percentile_ms > RETIME * expected:  # a slow stretch?
            tg = desk.retime(grown)
        else:
            tg = _borderline(desk, grown, tg, budget)
        if tg.at_percentile_ms <= budget.limit_ms:
            widths, t = grown, tg
        else:
            desk.steps[-1]["step"] = "grow-rejected"
            blocked.add(stage)
    return widths, t


def _exchange(widths, t: Timing, desk: Desk, budget: Budget, min_width: int, grid: int, max_measures: int):
    """Below the window after the fill, or within the headroom above its bottom (`Budget.safe_low_ms`: the gate
    may read it under the window), with no single stage able to grow: try exchanges of width between stages
    (`_exchanges`), predicted from what was measured (`_from_measured`), the highest within the limit first; keep
    one that MEASURES in the window and costs no capability beyond the score's noise (`Desk.better`).

    The window is the latency target, capability decides inside it: below the window, an exchange that costs
    capability is tried too (after every one that does not, the best-scoring first) and kept only when it MEASURES
    in the window. At 2.5 x the fashion floor every exchange of 16/32/64/128 (0.876 x) scored worse than it, none
    was measured, and the run delivered under the window. A measurement just over the limit is timed once more
    (`_borderline`)."""
    tried = 0
    while t.at_percentile_ms < budget.safe_low_ms and len(desk.steps) < max_measures and tried < EXCHANGES:
        below = t.at_percentile_ms < budget.low_ms
        options = []
        for w in _exchanges(widths, min_width, grid):
            pred = _from_measured(w, widths, t.at_percentile_ms, desk)
            fresh = (key := tuple(sorted(w.items()))) not in desk.cache and key not in desk.screened_out
            if not (fresh and budget.low_ms <= pred <= budget.limit_ms * (1 + TOLERANCE)):
                continue
            keeps = desk.better(w, widths)
            if keeps or below:  # one that scores worse inside the window could never be kept: not measured
                options.append((not keeps, -desk.score(w) if not keeps else 0.0, _rank(pred, budget.limit_ms), pred, w))
        if not options:
            break
        *_, pred, w = min(options, key=lambda o: o[:3])  # capability kept first, then the highest within the limit
        tried += 1
        if _screened_over(desk, w, budget, pred):
            continue
        tw = _borderline(desk, w, desk(w, "exchange"), budget)
        ms = tw.at_percentile_ms
        if desk.better(w, widths):
            # below the window any gain counts; inside it (under safe_low) only a move that reaches safe_low: the
            # searched shape is not traded for a few microseconds
            gain = below or ms >= budget.safe_low_ms
            keep = gain and t.at_percentile_ms < ms <= budget.limit_ms
        else:
            keep = below and budget.low_ms <= ms <= budget.limit_ms  # capability spent only to land in the window
        if keep:
            widths, t = w, tw
    return widths, t


def _borderline(desk: Desk, widths: dict[str, int], t: Timing, budget: Budget) -> Timing:
    """`t`, or the lower of it and one more timing when it measured over the limit by at most BORDERLINE: on a
    noisy machine (6.6% session spread on a 2-core VM) a network at 1.0001 x the limit was turned away and the run
    delivered under the window."""
    if budget.limit_ms < t.at_percentile_ms <= (1 + BORDERLINE) * budget.limit_ms:
        return desk.retime(widths)
    return t


def _screened_over(desk: Desk, widths: dict[str, int], budget: Budget, expected_ms: float) -> bool:
    """True when `widths` (not timed in full yet), predicted from what was measured (`expected_ms`) within
    `desk.screen_out` of the limit or over it, screens more than `screen_out` over the limit at the latency model's
    timing - and not more than RETIME over `expected_ms` (a screen read in a slow stretch rejects nothing: the
    gate-length timing decides). A network predicted well under the limit is timed in full without a screen. The
    screen is logged in `screens` with `rejected`; it is never a verdict that keeps a network."""
    if desk.quick is None or tuple(sorted(widths.items())) in desk.cache:
        return False
    if expected_ms < (1 - desk.screen_out) * budget.limit_ms:
        return False
    ms = desk.screen(widths, desk.quick).at_percentile_ms
    over = (1 + desk.screen_out) * budget.limit_ms < ms <= RETIME * expected_ms
    desk.screens[-1]["rejected"] = over
    if over:
        desk.screened_out.add(tuple(sorted(widths.items())))
        desk.reporter.log(f"bake screened out: {widths} ({ms:.4f} ms > {budget.limit_ms:.4f} ms limit)")
    return over


def _exchanges(widths: dict[str, int], min_width: int, grid: int) -> list[dict[str, int]]:
    """Networks one grid step away in some stages, at least one up and one down (down to min_width): every such
    combination for up to EXCHANGE_ALL stages (e.g. 16/32/64 -> 8/48/48), else one stage up and one down."""
    steps = {
        s: [step_up(w, grid)] + ([step_down(w, grid, min_width)] if w > min_width else []) for s, w in widths.items()
    }
    if len(widths) > EXCHANGE_ALL:
        return [
            {**widths, up: steps[up][0], down: steps[down][1]}
            for up, down in itertools.permutations(widths, 2)
            if len(steps[down]) > 1
        ]
    out = []
    for combo in itertools.product(*([w, *steps[s]] for s, w in widths.items())):
        w = dict(zip(widths, combo))
        if any(w[s] > widths[s] for s in w) and any(w[s] < widths[s] for s in w):
            out.append(w)
    return out


def _from_measured(widths: dict, base: dict, base_ms: float, desk: Desk) -> float:
    """`widths` predicted from the measured network `base`: base_ms plus, for each stage that differs, the measured
    difference of two networks that differ in that stage alone by the same change (screens count, the gate-length
    timing where there is one), else the model's difference
    scaled by its local bias (measured / predicted at base). The model's errors are per stage (on this CPU a stage
    of 8 channels costs less than the block of 16 it is charged at): a measured difference corrects them."""
    measured = {k: t.at_percentile_ms for k, t in {**desk.screened, **desk.cache}.items()}  # full ones win
    local = base_ms / float(desk.latency.predict(base))
    total, here = base_ms, dict(base)
    for stage in widths:
        if widths[stage] == here[stage]:
            continue
        step = _measured_step(measured, stage, here[stage], widths[stage])
        after = {**here, stage: widths[stage]}
        total += step if step is not None else local * float(desk.latency.predict(after) - desk.latency.predict(here))
        here = after
    return total


def _measured_step(measured: dict[tuple, float], stage: str, old: int, new: int) -> float | None:
    """ms(stage at new) - ms(stage at old) from a measured pair identical in every other stage (None: no pair)."""
    for key, ms in measured.items():
        w = dict(key)
        if w[stage] == old and (other := measured.get(tuple(sorted({**w, stage: new}.items())))) is not None:
            return other - ms
    return None


def _window_note(fitted: Fitted, desk: Desk, budget: Budget) -> str:
    """Empty when the result lands in [low_ms, ms]; else the two measured neighbours that straddle the window: the
    delivered network and the cheapest measured network over the limit (the budget less the timing headroom)."""
    if budget.low_ms <= fitted.measured_ms <= budget.ms:
        return ""
    over = [s for s in desk.steps if s["measured_ms"] > budget.limit_ms]
    over = over or [s for s in desk.screens if s.get("rejected")]  # nothing over in full: a screened-out step up
    nxt = min(over, key=lambda s: s["measured_ms"]) if over else None
    return (
        f"no measured network lands in [{budget.low_ms:.4f}, {budget.limit_ms:.4f}] ms (the window up to the budget "
        f"less {100 * budget.headroom:.1f}% timing headroom): {fitted.widths} measures {fitted.measured_ms:.4f} ms"
        + (f", the next step up {nxt['widths']} measures {nxt['measured_ms']:.4f} ms" if nxt else "")
    )
