"""Measuring the latency model on the deployment runtime: one network timed in fresh sessions (median), the probe
of the runtime's channel block, samples across the width box, and samples concentrated near the budgets.

`profile` makes a `latency.LatencyModel`; `refine` concentrates one at budgets; both hand the model to a
`checkpoint` callback whenever it changed (the run saves it, so a killed run resumes from what was measured).
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from flexslim.errors import BadInput
from flexslim.latency import cache as latency_cache
from flexslim.latency.fingerprint import measuring_device
from flexslim.latency.model import NEAR, LatencyModel, Point
from flexslim.models.arch import Arch
from flexslim.recipe import checks
from flexslim.recipe.schema import LatencyConfig
from flexslim.system.console import Reporter

BLOCK_CANDIDATES = (1, 2, 4, 8, 16, 32)
PROBE_TOP = 128  # channels: the widest network the probe times
PROBE_RUNS = 10  # the fewest timed passes of a probe network
BELOW_BLOCK_SAVING = 0.05  # the narrowest network this much faster than every stage at the block: not padded
EXTENSIONS = 2  # a budget beyond the box's top: the top is doubled at most this many times to reach it


# -- measuring ----------------------------------------------------------------------------------------------
def measure(arch: Arch, widths: dict[str, int], settings: LatencyConfig, seed: int = 0):
    """Export the dense network at `widths` and time it on the deployment runtime in the isolated timing
    process, in `settings.repeats` fresh sessions of `min_seconds / repeats` each -> the runtime.Timing of the
    median session (its `at_percentile_ms` is the median of the sessions' percentiles)."""
    return measure_sessions(arch, widths, settings, seed)[0]


def measure_sessions(arch: Arch, widths: dict[str, int], settings: LatencyConfig, seed: int = 0):
    """(Timing of the median session, every session's percentile) for one network; see `measure`. The latency cache
    answers when it holds this graph measured at least as thoroughly on this device (`latency.cache`) - first by the
    network's description and flexslim's model code, without exporting, then by the exported graph; what is timed
    here is added to it."""
    from flexslim.latency.fingerprint import precision_tag
    from flexslim.models.families import build_network
    from flexslim.models.onnx_graph import onnx_bytes
    from flexslim.models.precision import deployed

    tag = precision_tag(settings)
    net = latency_cache.network_key(arch, widths, tag)
    hit = latency_cache.served(net, settings)  # no export needed
    if hit is not None:
        return hit, hit.sessions
    torch.manual_seed(seed)
    with _one_thread():
        model = onnx_bytes(build_network(arch, widths).eval(), arch.input_shape, fast=True)
        # timed as deployed: quantized (calibrated on noise: the ranges do not change the graph's operators) or fp16
        model = deployed(model, settings.precision, settings.int8_format)
    network = {"family": arch.family, "widths": dict(widths), "input_shape": list(arch.input_shape)}
    if tag:
        network["precision"] = tag
    t = latency_cache.timing_of(model, settings, lambda: _timed_sessions(model, settings, seed), network, net=net)
    return t, t.sessions


@contextlib.contextmanager
def _one_thread():
    """torch on one intra-op thread while open: tracing a small network for export is 0.1 s on one thread and
    0.6-0.9 s on two of a busy 2-core machine (measured), and nothing here needs more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _timed_sessions(model: bytes, settings: LatencyConfig, seed: int):
    """The Timing of the median of `settings.repeats` fresh sessions of `model` in the isolated timing process (on
    the remote timer's device when the job names one: `latency.remote`), with every session's percentile in
    `sessions` (sorted)."""
    from flexslim.latency import remote
    from flexslim.latency.runtime import TimingPlan, time_isolated

    s, n = settings, max(1, settings.repeats)
    plan = TimingPlan(
        s.batch, s.warmup, s.runs, s.percentile, s.threads, seed, s.min_seconds / n, s.timeout, s.tolerance
    )
    timer = remote.configured()  # the deployment device's timer, when the job names one (--timer)
    if timer is not None:
        timings = [remote.time_model_bytes(timer, model, s.provider, plan) for _ in range(n)]
    else:
        timings = [time_isolated(model, s.provider, plan) for _ in range(n)]
    timings.sort(key=lambda t: t.at_percentile_ms)
    return replace(timings[(n - 1) // 2], sessions=tuple(t.at_percentile_ms for t in timings))


Measurer = Callable[[Arch, dict[str, int], LatencyConfig, int], tuple]


def _measure_points(arch, width_sets, settings, reporter, what, measurer: Measurer) -> tuple[list[Point], str, str]:
    points, provider, runtime = [], "cpu", ""
    device = measuring_device(settings)["id"] if width_sets else ""
    reporter.start(what, len(width_sets))
    for i, w in enumerate(width_sets):
        t, repeats = measurer(arch, w, settings, i)
        points.append(Point(dict(w), t.at_percentile_ms, t.p50_ms, repeats, device))
        provider, runtime = t.provider, t.runtime
        reporter.advance(f"{t.at_percentile_ms:.4f} ms  {w}")
    reporter.stop()
    return points, provider, runtime


# -- the precision: which int8 format runs fastest here ----------------------------------------------------------
def check_precision_runs(settings: LatencyConfig) -> None:
    """BadInput (before anything is measured or searched) when `settings.precision` cannot run on the provider
    that runs here: fp16 needs onnxruntime's CUDA provider."""
    from flexslim.latency.model import provider_that_runs

    if settings.precision == "fp16" and (ran := provider_that_runs(settings.provider)) != "cuda":
        raise BadInput(
            f"--precision fp16 runs on onnxruntime's CUDA provider only, and this job would run on {ran} "
            f"(latency.provider {settings.provider}): use --precision fp32 or int8 here, or a CUDA machine"
        )


def int8_format_for(
    arch: Arch, settings: LatencyConfig, reporter: Reporter, measurer: Measurer | None = None
) -> tuple[LatencyConfig, dict[str, float]]:
    """(`settings` with `int8_format` resolved, the probe's timings). For int8 with int8_format auto: the recipe's
    own network timed at fp32 and in every INT8_FORMATS format, the fastest format kept; BadInput when none is faster
    than fp32 (int8 would only cost accuracy here). Other precisions and a chosen format: as they are, no timings."""
    from flexslim.recipe.choices import INT8_FORMATS

    check_precision_runs(settings)
    if settings.precision != "int8" or settings.int8_format != "auto":
        return settings, {}
    measurer = measurer or measure_sessions
    reporter.log(f"int8: timing {', '.join(INT8_FORMATS)} against fp32 on the recipe's network {arch.widths}")
    candidates = {"fp32": replace(settings, precision="fp32"), **{f: replace(settings, int8_format=f) for f in INT8_FORMATS}}
    timings = {name: measurer(arch, dict(arch.widths), s, 0)[0].at_percentile_ms for name, s in candidates.items()}
    best = min(INT8_FORMATS, key=timings.__getitem__)
    shown = ", ".join(f"{name} {ms:.4f} ms" for name, ms in timings.items())
    if timings[best] >= timings["fp32"]:
        raise BadInput(
            f"int8 is not faster than fp32 on this device in any format at the recipe's widths ({shown}): "
            "use --precision fp32 (or pin latency.int8_format to search for one anyway)"
        )
    reporter.log(f"int8: {best} is the fastest here ({shown}): the search measures it")
    return replace(settings, int8_format=best), timings


# -- the probe: which channel block the runtime charges ---------------------------------------------------------
def detect_block(timings: dict[int, float], candidates: Sequence[int] = BLOCK_CANDIDATES) -> int:
    """The channel block that explains `timings` (width -> ms of one network whose every stage has that width).

    For each candidate block B the timings are fitted by a + b x + c x^2 with x = B * ceil(w / B) (a network's
    cost grows with the square of a shared width); the smallest B whose residual is within 10% of the best one
    wins, so a runtime without blocking (a smooth curve) gets the smallest block the probe's grid can tell.
    The residual is relative (each timing's error over the timing): the steps a block makes show among the narrow
    networks, whose timings are a tenth of the widest ones'; in absolute terms the widest networks' noise hid them.
    Measured on a 2-core AMD VM (quickstart family at 16x16): 16, 24, 32, 40, 48 read 0.041, 0.102, 0.099, 0.201,
    0.206 ms - 24 costs what 32 costs - yet the absolute fit called it block 1 (relative residual 0.207 for blocks
    1-8, 0.044 for 16).
    """
    widths = sorted(timings)
    y = np.array([timings[w] for w in widths])
    rss = {}
    for b in candidates:
        x = np.array([b * math.ceil(w / b) for w in widths], dtype=float)
        design = np.stack([np.ones_like(x), x, x * x], axis=1) / np.maximum(y, 1e-12)[:, None]  # relative
        coef, *_ = np.linalg.lstsq(design, np.ones_like(y), rcond=None)
        rss[b] = float(((design @ coef - 1.0) ** 2).sum())
    best = min(rss.values())
    return min(b for b in candidates if rss[b] <= 1.1 * best + 1e-18)


def probe_block(
    arch: Arch, settings: LatencyConfig, min_width: int, measurer: Measurer, reporter: Reporter, step: int = 4
) -> tuple[int, dict[str, float]]:
    """Time the family with every stage at w = step, 2 step, ... up to 64, then every 2 step up to 2 x the widest
    recipe stage but never past PROBE_TOP, and detect the block (see `detect_block`). Blocks up to 32 show within
    the first 64 channels; the cap keeps a wide family (ResNet-50's 2048) from costing hundreds of networks."""
    top = min(PROBE_TOP, max(64, 2 * max(arch.widths.values())))
    first = max(step, min_width - min_width % step)
    grid = list(range(first, min(top, 64) + 1, step)) + list(range(64 + 2 * step, top + 1, 2 * step))
    sets = [{s: w for s in arch.widths} for w in grid]
    # one session, a ninth of the seconds, a fifth of the passes: the probe looks for steps of 10% and more in one
    # curve; three full sessions of the widest probe networks (every stage at 128) took 2.8 s a network (measured)
    quick = replace(settings, min_seconds=settings.min_seconds / 9, repeats=1, runs=max(PROBE_RUNS, settings.runs // 5))
    with latency_cache.exactly():  # only earlier probes answer: one kind of measurement along the curve
        points, _, _ = _measure_points(arch, sets, quick, reporter, "latency: probing channel blocks", measurer)
    timings = {w: p.ms for w, p in zip(grid, points)}
    return detect_block(timings), {str(w): ms for w, ms in timings.items()}


def below_block(points: Sequence[Point], block: int, min_width: int) -> str:
    """How the runtime charges a width under its channel block, by measurement: "width" (as itself) when the
    narrowest network (every stage at `min_width`) measures more than BELOW_BLOCK_SAVING under the network with every
    stage at the block, else "block" (padded to it, as the probe's blocking says). onnxruntime's CPU provider runs a
    convolution whose channels are not a multiple of its block without its blocked layout: at 28x28, 8/8/8/8
    measured 0.0605 ms and 16/16/16/16 0.0734 ms (gate-length sessions), while one-session probe timings read the
    pair alike (0.080 and 0.076 ms: too short to tell)."""
    by_widths = {tuple(sorted(p.widths.items())): p.ms for p in points}
    stages = sorted(points[0].widths) if points else []
    floor = by_widths.get(tuple((s, min_width) for s in stages))
    full = by_widths.get(tuple((s, block) for s in stages))
    if min_width >= block or floor is None or full is None:
        return "block"
    return "width" if floor < (1 - BELOW_BLOCK_SAVING) * full else "block"


def _reach(model: LatencyModel, budget_ms: float, grid: int, rng, reporter, measurer: Measurer) -> list[Point]:
    """Extend the box until the budget lies inside it: while even its top (every stage at the box's widest) is
    predicted under the budget's near band, the top is doubled (at most EXTENSIONS times), measured with a few
    networks of the grown box, and the model refitted -> the points measured. Without it, a budget the box cannot
    reach is searched on an extrapolation: at int8 the quickstart box (top 32/64/128, measured 0.0408 ms) lay under
    the 0.06 ms budget, the search went to 50/114/143 and the bake's first choice measured 1.5 x its prediction."""
    s, points = model.settings, []
    for _ in range(EXTENSIONS):
        top = {st: hi for st, (_, hi) in model.region.items()}
        if float(model.predict(top)) >= (1 - NEAR) * budget_ms:
            break
        wider = {st: min(checks.MAX_WIDTH, grid * math.ceil(2 * w / grid)) for st, w in top.items()}
        if wider == top:
            break
        model.region = {st: [lo, wider[st]] for st, (lo, _) in model.region.items()}
        sets = [wider] + [_sample(rng, model.region, grid) for _ in range(max(2, s.samples // 4))]
        what = f"latency: the budget {budget_ms:g} ms lies beyond the box, its top grown to {wider}"
        got, _, _ = _measure_points(model.arch, sets, s, reporter, what, measurer)
        model.fit_points.extend(got)
        model.fit()
        points += got
    return points


# -- sampling where the search and the budgets are ---------------------------------------------------------------
def _sample(rng: random.Random, region: dict[str, list[int]], grid: int) -> dict[str, int]:
    """One network of the region: each stage at a width the bake can deliver - the region's bottom (min_width,
    which may lie under the grid and the channel block: the fit must see it to know how it is charged) or a grid
    multiple up to the region's top - drawn uniformly."""
    out = {}
    for stage, (lo, hi) in region.items():
        options = grid_widths(lo, hi, grid)
        out[stage] = options[rng.randrange(len(options))]
    return out


@functools.lru_cache(maxsize=256)
def grid_widths(lo: int, hi: int, grid: int) -> tuple[int, ...]:
    """The widths a stage can be delivered at between `lo` (min_width, kept even under the grid) and `hi`: lo and
    the grid's multiples above it (8, 16, 32, 48 for lo 8, grid 16 - not 24 or 40, which a 16-channel block charges
    as 32 and 48). Cached: `near_budget_sets` draws 4,000 networks, and over a table's region up to MAX_WIDTH
    building the list each draw took 15 s of a DARTS search."""
    return tuple(sorted({lo} | set(range(grid * -(-lo // grid), hi + 1, grid))))


def near_budget_sets(
    model: LatencyModel, budget_ms: float, n: int, grid: int, rng: random.Random, exclude: Sequence[dict] = ()
) -> list[dict]:
    """`n` distinct grid networks of the region whose predicted latency is within NEAR of the budget, spread
    over that band (the ones the bake will choose among), none already measured or in `exclude`."""
    seen = {
        tuple(sorted(w.items())) for w in [p.widths for p in model.fit_points + model.holdout_points] + list(exclude)
    }
    pool: dict[tuple, float] = {}
    for _ in range(4000):
        w = _sample(rng, model.region, grid)
        key = tuple(sorted(w.items()))
        if key not in seen and key not in pool:
            ratio = float(model.predict(w)) / budget_ms
            if abs(ratio - 1) <= NEAR:
                pool[key] = ratio
    ranked = sorted(pool.items(), key=lambda kv: kv[1])
    if len(ranked) <= n:
        return [dict(k) for k, _ in ranked]
    picks = [ranked[round(i * (len(ranked) - 1) / max(1, n - 1))][0] for i in range(n)]
    return [dict(k) for k in dict.fromkeys(picks)]


@dataclass(frozen=True)
class Sampling:
    """Where the latency model samples networks: near `budgets` (ms), inside a box whose top is `hi` (stage ->
    width; default twice the recipe's widths), drawn with `seed`."""

    budgets: Sequence[float] = ()
    hi: dict[str, int] | None = None
    seed: int = 0


def profile(
    arch: Arch,
    settings: LatencyConfig,
    min_width: int,
    round_to: int = 0,
    *,
    sampling: Sampling | None = None,
    reporter: Reporter | None = None,
    measurer: Measurer = measure_sessions,
    checkpoint: Callable[[LatencyModel], None] | None = None,
) -> LatencyModel:
    """Probe the channel block, measure the narrowest network, the recipe's own, the top of the region (default
    twice the recipe's widths) and random networks on the grid; fit; then, for each of `sampling.budgets`, measure
    networks predicted near it (`settings.near` to fit, one more held out) and refit.

    Args:
        sampling: the budgets to sample near, the box top and the seed (default: no budgets, 2 x the widths, 0).
        round_to: the width grid to sample on (0: the detected block, at least 8).
        measurer: (arch, widths, settings, seed) -> (Timing, session percentiles); tests pass a fake.
        checkpoint: called with the model whenever it changed (after the fit, the hold-out, each budget).
    """
    sampling = sampling or Sampling()
    budgets, hi, seed = sampling.budgets, sampling.hi, sampling.seed
    reporter = reporter or Reporter()
    if settings.samples < 3:
        raise BadInput(f"latency.samples must be >= 3 to fit a model, got {settings.samples}")
    t0 = time.perf_counter()
    settings, formats = int8_format_for(arch, settings, reporter, measurer)
    block, probe = (1, {})
    if settings.probe:  # every 8 channels when the grid is a multiple of 8: blocks below 8 round to the same grid
        step = 8 if round_to % 8 == 0 else 4
        block, probe = probe_block(arch, settings, min_width, measurer, reporter, step=step)
    grid = round_to or max(8, block)
    hi = hi or {s: max(2 * w, min_width + grid) for s, w in arch.widths.items()}
    region = {s: [min_width, int(hi[s])] for s in arch.widths}
    rng = random.Random(seed)
    fit_sets = [{s: min_width for s in arch.widths}, dict(arch.widths), {s: region[s][1] for s in region}]
    at_block = {s: block for s in arch.widths}  # against the floor: how a width under the block is charged
    if min_width < block and at_block not in fit_sets:
        fit_sets.append(at_block)
    fit_sets += [_sample(rng, region, grid) for _ in range(max(0, settings.samples - len(fit_sets)))]
    fit_pts, provider, runtime = _measure_points(arch, fit_sets, settings, reporter, "latency: fit networks", measurer)
    model = LatencyModel(arch, settings, provider, runtime, platform.node(), block, probe=probe, region=region,
                         fit_points=fit_pts, floor_ms=fit_pts[0].ms, device=measuring_device(settings),
                         formats=formats)  # fmt: skip
    model.below_block = below_block(fit_pts, block, min_width)
    model.fit()
    model.measure_seconds = time.perf_counter() - t0
    if checkpoint is not None:
        checkpoint(model)
    hold = [_sample(rng, region, grid) for _ in range(settings.holdout)]  # the box; refine adds near-budget ones
    model.holdout_points, _, _ = _measure_points(arch, hold, settings, reporter, "latency: hold-out", measurer)
    model.measure_seconds = time.perf_counter() - t0
    if checkpoint is not None:
        checkpoint(model)
    refine(model, budgets, grid=grid, seed=seed + 1, reporter=reporter, measurer=measurer, checkpoint=checkpoint)
    return model


def refine(
    model: LatencyModel,
    budgets: Sequence[float],
    *,
    grid: int,
    seed: int = 1,
    reporter: Reporter | None = None,
    measurer: Measurer = measure_sessions,
    checkpoint: Callable[[LatencyModel], None] | None = None,
) -> bool:
    """Concentrate the table at `budgets`: for each budget the table was not refined for yet and with fewer than
    `settings.near` fit points measured near it, measure networks predicted near it (and one more held out),
    refit, and hand the model to `checkpoint` (which saves it: a killed run resumes from what was measured).
    The search then runs on the refined table, unchanged (deterministic). False when nothing was measured."""
    reporter = reporter or Reporter()
    s, rng = model.settings, random.Random(seed + len(model.fit_points))
    measured = False
    if budgets and model.measured_elsewhere(here := measuring_device(s)):  # never mix two devices' points
        reporter.log(
            f"latency table measured on device {model.device.get('id')} ({model.device.get('device', '?')}), this "
            f"job measures on {here['id']} ({here['device']}): the table is not extended here"
        )
        return False
    for b in (float(b) for b in budgets):
        missing = s.near - len(model.near(b))
        if b in model.budgets or missing <= 0:
            model.budgets = sorted(set(model.budgets) | {b})
            continue
        t0 = time.perf_counter()
        measured = bool(_reach(model, b, grid, rng, reporter, measurer)) or measured
        sets = near_budget_sets(model, b, missing + 1, grid, rng)
        hold = [sets.pop(len(sets) // 2)] if len(sets) > 1 else []
        fit_pts, _, _ = _measure_points(model.arch, sets, s, reporter, f"latency: near {b:g} ms", measurer)
        hold_pts, _, _ = _measure_points(model.arch, hold, s, reporter, "latency: hold-out near it", measurer)
        model.fit_points.extend(fit_pts)
        model.holdout_points.extend(hold_pts)
        model.budgets = sorted(set(model.budgets) | {b})
        if fit_pts:
            model.fit()
        model.measure_seconds += time.perf_counter() - t0
        measured = measured or bool(fit_pts or hold_pts)
        if checkpoint is not None:
            checkpoint(model)
    return measured
