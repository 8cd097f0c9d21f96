"""The measured bake: from the searched (averaged) widths to the network that is delivered.

1. choose   every stage's searched width rounded down or up to the grid (all combinations for a few stages, a
            beam over the stages for many), ranked by the latency model: the most latency under the limit first;
2. measure  the best few, screened as the latency model times (its shorter, early-stopping sessions, often already
            in the latency cache); the one the screen ranks first (see `_chosen`) is then timed as the gate times it:
            `repeats` sessions of up to the gate's GATE_SECONDS each, each stopping once its percentile is known
            within `plan.tolerance` (`latency.bake_tolerance`, +-1%; 0: in full), and the spread of those sessions
            sets the headroom under the budget from here on (`confidence` spreads, see budget.py). Every later step
            is timed as the gate times it;
Steps 3 and 4 are `search.moves` (the moves and what they measure with); this module chooses, runs them, reports.

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
from dataclasses import asdict, dataclass, field, replace

from flexslim.latency import rechecks
from flexslim.latency.budget import MIN_HEADROOM, Budget
from flexslim.latency.model import LatencyModel
from flexslim.latency.profiling import measure
from flexslim.latency.runtime import GATE_SECONDS, Timing
from flexslim.models.arch import Arch
from flexslim.recipe.schema import LatencyConfig
from flexslim.search.desk import PREDICTED, Desk, Measure, Score
from flexslim.search.moves import SCREEN_OUT, TOLERANCE, borderline, exchange, fill, rank, trim
from flexslim.system.console import Reporter

ENUMERATE_UP_TO = 10  # stages; more than that: a beam over the stages
BEAM = 32
MEASURE_FIRST = 3  # rounded neighbours measured before trimming or filling
CONFIRMS = 3  # the most confirming timings (`_confirmed`) one bake makes
REFILL = 2  # growths a confirmed network under the window may still measure (past max_measures)


@dataclass
class Fitted:
    """The delivered widths, their last measurement, and every step of the bake.

    `steps`: {"step": choose | trim | grow | grow-rejected | exchange | confirm, "widths", "predicted_ms",
    "measured_ms"} (a confirm also "first_ms": the figure the network was chosen on);
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
    floor: dict | None = None  # the headroom's floor it was judged with (`latency.rechecks.Floor`, as a dict)

    @property
    def measurements(self) -> int:
        """How many gate-length timings the bake made (networks measured, and the delivered one's confirmation)."""
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
            beam = sorted(grown, key=lambda b: rank(float(latency.predict({**nearest, **b})), limit_ms))[:BEAM]
        combos = beam
    return sorted(combos, key=lambda w: rank(float(latency.predict(w)), limit_ms))


def nearest_rounding(centers: dict[str, float], grid: int, min_width: int) -> dict[str, int]:
    """Each stage's searched width rounded to the nearest grid width (min_width counts as one, even under the grid;
    a tie rounds up)."""
    return {s: min(reversed(_down_and_up(c, grid, min_width)), key=lambda w: abs(w - c)) for s, c in centers.items()}


def _down_and_up(c: float, grid: int, min_width: int) -> list[int]:
    """A searched width rounded down and up to the grid, never below min_width (one value when they coincide)."""
    return sorted({max(min_width, grid * math.floor(c / grid)), max(min_width, grid * math.ceil(c / grid))})


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
        session_seconds: timed seconds per session at most (the gate's); `settings.repeats` sessions per network.
        tolerance: a session stops sooner once its percentile is known within +-tolerance (the 95% interval from
            order statistics, after a quarter of `session_seconds`); 0: every session in full. On this 2-core VM
            (2026-12-08) three sessions stopping at +-1% took 1.6 s where three full ones took 6.1 s, and read
            0.6-0.8% lower; the headroom's measured floor (re-timings and the gate against the bake) absorbs that.
        screen_out: a growth or exchange whose screen (the latency model's timing: a fraction of a gate-length one)
            reads more than this fraction over the limit is rejected unmeasured in full (None: every one in full).
            Screens read ~1% under the gate and scatter more, so 5% over is over; only rejections are screened.
        confirm: the delivered network, when it was chosen among several measured (or timed twice), is timed once
            more, as the gate times it (one session of `session_seconds`, in full), and that timing is its verdict
            (`_confirmed`); over the limit, the trim runs again.

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
    tolerance: float = 0.0
    screen_out: float | None = SCREEN_OUT
    confirm: bool = False

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
            tolerance=recipe.latency.bake_tolerance,
            confirm=True,
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
    settings, min_width, grid, fit, confidence = plan.settings, plan.min_width, plan.grid, plan.fit, plan.confidence
    t0 = time.perf_counter()
    desk = _desk(arch, plan, latency, measure, reporter or Reporter(), score)
    floor = rechecks.floor(desk.device) if desk.device else rechecks.Floor(MIN_HEADROOM)
    if desk.device:
        desk.reporter.log(f"bake: {floor.describe()}")
    choices = rounded_neighbours(centers, grid, min_width, latency, budget.limit_ms)[: MEASURE_FIRST if fit else 1]
    near = nearest_rounding(centers, grid, min_width)
    if fit and score is not None and near not in choices and latency.predict(near) <= budget.limit_ms * (1 + TOLERANCE):
        choices.append(near)  # what the search found, rounded: screened whatever the latency it leaves unused
    if len(choices) > 1:  # ranked by a screen at the latency model's timing; the first is then timed in full
        first, _ = _chosen([(w, desk.screen(w, settings)) for w in choices], budget, score)
        choices = [first]
    timed = [(w, desk(w, "choose")) for w in choices]
    if confidence is not None and (spread := desk.spread()) is not None:
        budget = budget.refit(spread, confidence, floor.value)
    widths, t = _chosen(timed, budget, score)
    trims: list[dict] = []
    if fit:
        widths, t, trims = _to_the_window(widths, t, desk, budget, plan)
    fitted = Fitted(
        dict(widths), t.at_percentile_ms, t.p50_ms, t.provider, trims, desk.steps, desk.screens, budget=budget
    )
    fitted.note = _window_note(fitted, desk, budget) if fit else ""
    fitted.floor = asdict(floor) if desk.device else None
    fitted.seconds = time.perf_counter() - t0
    return fitted


def _desk(arch: Arch, plan: BakePlan, latency: LatencyModel, measure: Measure, reporter, score) -> Desk:
    """The bake's desk for `plan`: its steps timed as the gate times, each session stopping once it knows its
    percentile (`plan.tolerance`; 0: in full); its verdict (the confirmation) exactly as the gate times, one session
    of its seconds in full (sessions that stop once they know read 0.7-2.2% lower on this VM, 2026-12-08: optional
    stopping ends in quiet stretches); its screens at the latency model's timing; its re-timings recorded for the
    measuring device when the headroom comes from measurement (`plan.confidence`)."""
    s, seconds = plan.settings, plan.session_seconds
    desk = Desk(arch, replace(s, min_seconds=seconds * max(1, s.repeats), tolerance=plan.tolerance), latency, measure,
                reporter)  # fmt: skip
    desk.score = score
    desk.quick = s if plan.screen_out is not None else None
    desk.screen_out = plan.screen_out or 0.0
    desk.device = _device(s, measure) if plan.confidence is not None else ""
    desk.verdict = replace(s, min_seconds=seconds, repeats=1, tolerance=0.0)
    return desk


def _device(settings: LatencyConfig, measure_fn) -> str:
    """The fingerprint id of the device `measure_fn` times on: this device's (or the remote timer's) for the real
    measurement, "" for another function (a test's clock: its timings are no device's re-timings)."""
    return rechecks.device_of(settings) if measure_fn is measure else ""


def _to_the_window(widths: dict, t: Timing, desk: Desk, budget: Budget, plan: BakePlan):
    """The measured moves from the chosen network: trim while over the limit, fill, exchange (the fill again after
    an exchange kept under the window: it may open a growth, 8/48/48/112 -> 8/48/64/112), and still under the window
    the growths the latency model rules out, screened -> (widths, their Timing, the trims). A chosen network just
    over the limit is timed once more before it is trimmed, as a growth is (`borderline`): at 1.5 x the fashion
    floor 8/16/32/64 read 0.0846 ms against a limit of 0.0845 and was trimmed a whole step, to 0.81 x the budget."""
    min_width, grid, most = plan.min_width, plan.grid, plan.max_measures
    if t.runtime != PREDICTED:
        t = borderline(desk, widths, t, budget)
    widths, t, trims = trim(widths, t, desk, budget, min_width, grid, most)
    widths, t = fill(widths, t, desk, budget, grid, most)
    while True:
        before = widths
        widths, t = exchange(widths, t, desk, budget, min_width, grid, most)
        if widths == before or t.at_percentile_ms >= budget.safe_low_ms:
            break
        widths, t = fill(widths, t, desk, budget, grid, most)
    if t.at_percentile_ms < budget.low_ms:
        widths, t = fill(widths, t, desk, budget, grid, most, beyond=True)
    if plan.confirm:
        widths, t, more = _confirmed(widths, t, desk, budget, plan)
        trims += more
    return widths, t, trims


def _confirmed(widths: dict, t: Timing, desk: Desk, budget: Budget, plan: BakePlan):
    """The delivered network's verdict from a timing taken after it was chosen (`Desk.confirm`) when it was chosen
    among several networks measured in full, or its figure came from a second timing: the figure it won on is the
    luckiest of those chances. Over the limit on the fresh timing, the best other network measured within the limit
    is taken instead (the README job exchanged 16/16/64, 0.0500 ms, for 8/16/80, which confirmed over the limit and
    was trimmed to 8/16/64, 0.74 x the budget), else it is trimmed again (allowed past max_measures: a network over
    the limit is never delivered for want of measurements); either is confirmed in turn, at most CONFIRMS timings
    (in the README job 16/40/80 confirmed over the limit, the trim went to 16/40/72 on a figure measured a minute
    earlier, and the gate read it 0.0627 ms). After the last confirmation only a trim, whose figure is fresh: a
    network taken back then would be delivered on its old figure (the pipeline test's bake confirmed three networks
    over the limit and delivered a fourth on a figure read minutes before) -> (widths, Timing, trims).

    A confirmed network under the window (a fallback: the growth that confirmed over was not its only one) grows
    once more before it is delivered, by the growths not yet measured over (at most REFILL timings), and the grown
    network is confirmed in turn: at 0.048 ms the README job's 16/48/80 confirmed over the limit and its fallback
    16/32/80 was delivered at 0.81 x, 16/32/96 never measured.

    Measured (2-core AMD VM, int8 README job at 0.06 ms): 48/40/128 was chosen at 0.0564 ms, confirmed at 0.0526,
    and read 0.0603 by the export gate minutes later - one timing's figure is one draw of a drifting machine."""
    retimed = any(s.get("retimed") for s in desk.steps if s["widths"] == widths)
    if t.runtime == PREDICTED or not (len(desk.steps) > 1 or retimed):
        return widths, t, []
    trims: list[dict] = []
    for n in range(1, CONFIRMS + 1):  # a trimmed network's figure may be an old one too (the desk's): confirmed in turn
        t = desk.confirm(widths)
        if t.at_percentile_ms <= budget.limit_ms:
            if t.at_percentile_ms < budget.low_ms and n < CONFIRMS:  # under the window: its untried growths first
                grown, tg = fill(widths, t, desk, budget, plan.grid, max(plan.max_measures, len(desk.steps) + REFILL))
                if grown != widths:
                    widths, t = grown, tg
                    continue  # the grown network won on one timing: confirmed in turn
            break
        within = [(w, wt) for w, wt in _measured(desk) if w != widths and wt.at_percentile_ms <= budget.limit_ms]
        if within and n < CONFIRMS:  # back to the best network measured within the limit (confirmed in turn)
            widths, t = _chosen(within, budget, desk.score)
            continue
        widths, t, more = trim(widths, t, desk, budget, plan.min_width, plan.grid, len(desk.steps) + plan.max_measures)
        trims += more
    return widths, t, trims


def _measured(desk: Desk) -> list[tuple[dict, Timing]]:
    """Every network the desk timed in full, with its latest timing (a confirmed one's fresh figure); a figure taken
    before a confirmation found the machine moved is scaled by that move (`Desk.figure`). A quickstart-budget Fashion
    bake chose 16/16/32/64 at 0.0718 ms (limit 0.0725), confirmed it at 0.0736, fell back to two networks in turn on
    figures read before the machine slowed (0.0713, 0.0702), both confirmed over the limit, and the trim delivered
    0.84 x the budget; 16/16/16/80 (0.0679 before, 0.0696 scaled) was in the window."""
    return [(dict(key), replace(t, at_percentile_ms=desk.figure(dict(key)))) for key, t in desk.cache.items()]


def _chosen(timed: list[tuple[dict, Timing]], budget: Budget, score: Score | None) -> tuple[dict, Timing]:
    """Of the measured choices: within the limit, of those scoring no worse than the best beyond the score's noise
    (without a score: all), the one using most latency (the fill and the exchanges then bring it into the window);
    else the lowest over it.

    Capability decides before the window does: at 1.5 x the floor of the fashion recipe the choice the window
    preferred (16/8/32/64, in it at 0.958 x, supernet score 0.43) retrained 1.1 points below uniform scaling's
    16/16/32/64, while the searched widths rounded (8/16/32/80, 0.85 x before the fill) had been passed over. But a
    difference inside the noise decides nothing, and it leans one way: a wider network's added channels are the
    supernet's least trained, so it scores a little lower and retrains better. At 4 x that floor 16/48/80/160 (0.93 x)
    confirmed over the limit and the fallback took the best score, 16/32/64/128 (0.785 on 4,096 images, one
    standard error 0.006) at 0.63 x, over 16/32/96/160 (0.781) at 0.88 x."""
    ms = lambda wt: wt[1].at_percentile_ms  # noqa: E731
    within = [wt for wt in timed if ms(wt) <= budget.limit_ms]
    if within and score is not None:
        best = max(score(w) for w, _ in within)
        within = [wt for wt in within if score(wt[0]) >= best - score.noise(best)]
    return max(within, key=ms) if within else min(timed, key=ms)


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
