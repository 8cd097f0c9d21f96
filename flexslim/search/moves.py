"""The bake's measured moves from a chosen network towards the window: trim while over the limit, grow stages
back while they measure within it (`fill`), exchange width between stages when still under the window, and what
those moves measure with - a screen that may reject a step before its gate-length timing (`screened_over`), one
more timing just over the limit (`borderline`), predictions corrected by measured differences (`from_measured`).
Every step moves between deliverable widths (`step_up`, `step_down`). `search.bake` chooses, calls these, reports.
"""

from __future__ import annotations

import itertools
import math

from flexslim.errors import BadInput
from flexslim.latency.budget import Budget
from flexslim.latency.model import LatencyModel
from flexslim.latency.runtime import Timing
from flexslim.search.desk import RETIME, Desk

EXCHANGE_ALL = 6  # stages: up to this many, exchanges may move every stage at once (3^n networks)
EXCHANGES = 4  # at most this many width exchanges measured when the fill ends below the window
TOLERANCE = 0.04  # growths predicted up to this far over the limit are still measured (hold-out error near budgets)
SCREEN_OUT = 0.05  # a growth or exchange screened this far over the limit is rejected without its gate-length timing
BORDERLINE = 0.02  # a growth or exchange measured at most this far over the limit is timed once more (lower kept)


def step_up(w: int, grid: int) -> int:
    """The next deliverable width above `w`: the next grid multiple (8 -> 16 and 24 -> 32 on a 16-grid, never 24 or
    40, which a 16-channel block charges as 32 and 48)."""
    return grid * (w // grid) + grid


def step_down(w: int, grid: int, min_width: int) -> int:
    """The next deliverable width below `w`: the grid multiple under it, or min_width (32 -> 16 -> 8 on a 16-grid
    with min_width 8; never 24)."""
    return max(min_width, grid * math.ceil(w / grid) - grid)


def rank(pred: float, limit: float) -> tuple:
    """Sort key of a predicted latency: within `limit` the highest first, then the rest the lowest first."""
    return (0, -pred) if pred <= limit else (1, pred)


def trim(widths, t: Timing, desk: Desk, budget: Budget, min_width: int, grid: int, max_measures: int):
    """Trim while over the limit, the stage that saves the most predicted time per relative width first
    (`best_trim`). Each measured step goes as far as the latency model, scaled by its bias measured at the current
    network, says the limit needs (at least one grid step): the int8 README job's first choice measured 1.27 x the
    limit where the model said 1.16 x, and the bake timed 16 one-step trims (about 100 s) to come under it."""
    trims: list[dict] = []
    while t.at_percentile_ms > budget.limit_ms and len(desk.steps) < max_measures:
        down = _trim_steps(widths, t, desk.latency, budget, min_width, grid)
        if not down:
            raise BadInput(
                f"every stage is at min_width {min_width} and the network still measures "
                f"{t.at_percentile_ms:.4f} ms > {budget.limit_ms:.4f} ms; raise --latency-ms or lower model.min_width"
            )
        trims += down
        widths = {**widths, **{s["stage"]: s["to"] for s in down}}
        t = desk(widths, "trim")
    return widths, t, trims


def _trim_steps(widths, t: Timing, latency: LatencyModel, budget: Budget, min_width: int, grid: int) -> list[dict]:
    """The grid steps down from `widths` (measured `t`, over the limit), `best_trim` first, until the model scaled by
    its bias measured here predicts the limit met (at least one step; none: every stage at min_width)."""
    local = t.at_percentile_ms / max(float(latency.predict(widths)), 1e-12)
    new, down = dict(widths), []
    while (stage := best_trim(new, latency, min_width, grid)) is not None:
        to = step_down(new[stage], grid, min_width)
        down.append({"stage": stage, "from": new[stage], "to": to, "measured_ms": t.at_percentile_ms,
                     "limit_ms": budget.limit_ms})  # fmt: skip
        new[stage] = to
        if local * float(latency.predict(new)) <= budget.limit_ms:
            break
    return down


def best_trim(widths: dict[str, int], latency: LatencyModel, min_width: int, grid: int) -> str | None:
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


def fill(widths, t: Timing, desk: Desk, budget: Budget, grid: int, max_measures: int, beyond: bool = False):
    """Grow stages while they measure within the limit: the most relative width per predicted ms first; a stage
    whose growth measured over the limit is not tried again - after one more timing when it measured RETIME over what
    the current network's measurement predicts for it (a slow stretch of the machine rejected good growths).

    `beyond` (the bake's last resort, under the window after the exchanges): a growth the model puts beyond
    TOLERANCE over the limit is screened too (after every growth it allows, the lowest predicted first): the model is
    not a verdict. At 2.5 x the fashion floor it predicted 16/48/64/128 at 1.11 x the limit, which measured 0.96 x,
    while the run delivered 16/32/64/128 under the window."""
    blocked: set[str] = set()
    while len(desk.steps) < max_measures:
        base = float(desk.latency.predict(widths))
        local = t.at_percentile_ms / base  # the model's bias here, by measurement: predictions are scaled by it
        below = beyond and t.at_percentile_ms < budget.low_ms and desk.quick is not None
        options = []
        for s, w in widths.items():
            grown = {**widths, s: step_up(w, grid)}
            pred = float(desk.latency.predict(grown))
            if s in blocked or _known_over(desk, grown, budget):
                continue
            if pred * local <= budget.limit_ms * (1 + TOLERANCE):
                options.append((0, -(grown[s] - w) / w / max(pred - base, 1e-9), s, grown))
            elif below:  # only a measurement can say: screened first, rejected unmeasured in full when over
                options.append((1, pred, s, grown))
        if not options:
            return widths, t
        *_, stage, grown = min(options, key=lambda o: o[:2])
        expected = local * float(desk.latency.predict(grown))
        if screened_over(desk, grown, budget, expected):
            blocked.add(stage)
            continue
        tg = desk(grown, "grow")
        if budget.limit_ms < tg.at_percentile_ms and tg.at_percentile_ms > RETIME * expected:  # a slow stretch?
            tg = desk.retime(grown)
        else:
            tg = borderline(desk, grown, tg, budget)
        if tg.at_percentile_ms <= budget.limit_ms:
            widths, t = grown, tg
        else:
            desk.steps[-1]["step"] = "grow-rejected"
            blocked.add(stage)
    return widths, t


def _known_over(desk: Desk, widths: dict[str, int], budget: Budget) -> bool:
    """True when `widths` already measured over the limit in full (by its figure scaled by the machine's measured
    move, when it predates it: `Desk.figure`) or was screened out before the machine moved: a later fill (after an
    exchange, after a confirmation) does not time it again."""
    key = tuple(sorted(widths.items()))
    if key in desk.screened_out and key not in desk.stale_screens:
        return True
    ms = desk.figure(widths)
    return ms is not None and ms > budget.limit_ms


def exchange(widths, t: Timing, desk: Desk, budget: Budget, min_width: int, grid: int, max_measures: int):
    """Below the window after the fill, or within the headroom above its bottom (`Budget.safe_low_ms`: the gate
    may read it under the window), with no single stage able to grow: try exchanges of width between stages
    (`exchanges`), predicted from what was measured (`from_measured`), the highest within the limit first; keep
    one that MEASURES in the window and costs no capability beyond the score's noise (`Desk.better`).

    The window is the latency target, capability decides inside it: below the window, an exchange that costs
    capability is tried too (after every one that does not, the best-scoring first) and kept only when it MEASURES
    in the window. At 2.5 x the fashion floor every exchange of 16/32/64/128 (0.876 x) scored worse than it, none
    was measured, and the run delivered under the window. A measurement just over the limit is timed once more
    (`borderline`)."""
    tried = 0
    while t.at_percentile_ms < budget.safe_low_ms and len(desk.steps) < max_measures and tried < EXCHANGES:
        below = t.at_percentile_ms < budget.low_ms
        options = []
        for w in exchanges(widths, min_width, grid):
            pred = from_measured(w, widths, t.at_percentile_ms, desk)
            fresh = (key := tuple(sorted(w.items()))) not in desk.cache and key not in desk.screened_out
            if not (fresh and budget.low_ms <= pred <= budget.limit_ms * (1 + TOLERANCE)):
                continue
            keeps = desk.better(w, widths)
            if keeps or below:  # one that scores worse inside the window could never be kept: not measured
                options.append((not keeps, -desk.score(w) if not keeps else 0.0, rank(pred, budget.limit_ms), pred, w))
        if not options:
            break
        *_, pred, w = min(options, key=lambda o: o[:3])  # capability kept first, then the highest within the limit
        tried += 1
        if screened_over(desk, w, budget, pred):
            continue
        tw = borderline(desk, w, desk(w, "exchange"), budget)
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


def borderline(desk: Desk, widths: dict[str, int], t: Timing, budget: Budget) -> Timing:
    """`t`, or the lower of it and one more timing when it measured over the limit by at most BORDERLINE: on a
    noisy machine (6.6% session spread on a 2-core VM) a network at 1.0001 x the limit was turned away and the run
    delivered under the window."""
    if budget.limit_ms < t.at_percentile_ms <= (1 + BORDERLINE) * budget.limit_ms:
        return desk.retime(widths)
    return t


def screened_over(desk: Desk, widths: dict[str, int], budget: Budget, expected_ms: float) -> bool:
    """True when `widths` (not timed in full yet), predicted from what was measured (`expected_ms`) within
    `desk.screen_out` of the limit or over it, screens more than `screen_out` over the limit at the latency model's
    timing - and not more than RETIME over `expected_ms` (a screen read in a slow stretch rejects nothing: the
    gate-length timing decides), unless `expected_ms` is itself more than `screen_out` over the limit (the bake's
    last resort screens such growths: a quickstart sweep timed one predicted 33% and screened 47% over the limit in
    full). A network predicted well under the limit is timed in full without a screen. The
    screen is logged in `screens` with `rejected`; it is never a verdict that keeps a network."""
    if desk.quick is None or tuple(sorted(widths.items())) in desk.cache:
        return False
    if expected_ms < (1 - desk.screen_out) * budget.limit_ms:
        return False
    ms = desk.screen(widths, desk.quick).at_percentile_ms
    over_by_far = (1 + desk.screen_out) * budget.limit_ms
    # a screen far over its prediction may have read a slow stretch, unless the prediction is itself far over too
    over = over_by_far < ms and (ms <= RETIME * expected_ms or over_by_far < expected_ms)
    desk.screens[-1]["rejected"] = over
    if over:
        desk.screened_out.add(tuple(sorted(widths.items())))
        desk.reporter.log(f"bake screened out: {widths} ({ms:.4f} ms > {budget.limit_ms:.4f} ms limit)")
    return over


def exchanges(widths: dict[str, int], min_width: int, grid: int) -> list[dict[str, int]]:
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


def from_measured(widths: dict, base: dict, base_ms: float, desk: Desk) -> float:
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
        step = measured_step(measured, stage, here[stage], widths[stage])
        after = {**here, stage: widths[stage]}
        total += step if step is not None else local * float(desk.latency.predict(after) - desk.latency.predict(here))
        here = after
    return total


def measured_step(measured: dict[tuple, float], stage: str, old: int, new: int) -> float | None:
    """ms(stage at new) - ms(stage at old) from a measured pair identical in every other stage (None: no pair)."""
    for key, ms in measured.items():
        w = dict(key)
        if w[stage] == old and (other := measured.get(tuple(sorted({**w, stage: new}.items())))) is not None:
            return other - ms
    return None
