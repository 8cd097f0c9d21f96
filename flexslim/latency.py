"""On-device latency model: measure whole dense networks on the deployment runtime, fit, predict
differentiably from (expected) widths, and report the model's own error on networks it did not fit.

Model: latency_ms = b + sum_t c_t * term_t(widths), where the terms are the family's analytic cost terms
(MACs and output elements per feature-map resolution, see `spaces.cost_terms`). Coefficients come from a
non-negative least-squares fit of the relative error (more channels never make a network faster). Every
point is the gate's own statistic: the percentile of per-sample latency of the exported network on the
chosen onnxruntime provider, batch and thread count. When the search allocates past the measured region,
`extend` measures networks out there and refits.
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flexslim.arch import Arch
from flexslim.config import LatencyConfig
from flexslim.console import Reporter
from flexslim.errors import BadInput
from flexslim.runs import atomic_write_json

TABLE_VERSION = 1


@dataclass(frozen=True)
class Point:
    """One measured network: its widths and per-sample latency (ms) at the percentile and at p50."""

    widths: dict[str, int]
    ms: float  # per-sample latency at the settings' percentile
    p50_ms: float


@dataclass
class LatencyModel:
    """The measured latency model of one family on one runtime setting (provider, batch, threads, percentile).

    latency_ms = intercept + sum_t coef_t * term_t(widths), fitted on `fit_points` and checked on
    `holdout_points` (networks it did not see). `predict` takes int widths or (expected) width tensors,
    so the search can differentiate it in mu. Saved as latency.json (`save`/`load`); `key()` says what a
    table is valid for.
    """

    arch: Arch  # the template: structure, input shape (its widths are not used)
    settings: LatencyConfig
    provider: str  # what actually ran
    runtime: str
    host: str
    terms: list[str] = field(default_factory=list)
    coef: list[float] = field(default_factory=list)
    intercept: float = 0.0
    region: dict[str, list[int]] = field(default_factory=dict)  # stage -> [lo, hi] measured widths
    fit_points: list[Point] = field(default_factory=list)
    holdout_points: list[Point] = field(default_factory=list)
    floor_ms: float = 0.0  # measured latency of the narrowest network (every stage at min_width)
    measure_seconds: float = 0.0

    # -- prediction -------------------------------------------------------------------------------
    def predict(self, widths: dict) -> torch.Tensor | float:
        """Predicted per-sample latency (ms); differentiable when the widths are tensors."""
        from flexslim.spaces import cost_terms

        t = cost_terms(self.arch, widths)
        total = self.intercept
        for name, c in zip(self.terms, self.coef):
            total = total + c * t.get(name, 0.0)
        return total

    def errors(self, points: list[Point] | None = None) -> list[float]:
        """Relative prediction errors (%) on the hold-out networks."""
        pts = self.holdout_points if points is None else points
        return [100.0 * abs(float(self.predict(p.widths)) - p.ms) / p.ms for p in pts]

    def error_summary(self) -> dict[str, float]:
        """Hold-out error: {"holdout": n, "median_pct": ..., "max_pct": ...} ({"holdout": 0} without hold-out)."""
        e = self.errors()
        if not e:
            return {"holdout": 0}
        return {"holdout": len(e), "median_pct": statistics.median(e), "max_pct": max(e)}

    def covers(self, widths: dict[str, int]) -> bool:
        """True when every stage's width lies in the measured region."""
        return all(self.region[s][0] <= w <= self.region[s][1] for s, w in widths.items())

    # -- fitting ----------------------------------------------------------------------------------
    def fit(self) -> None:
        """Non-negative least squares of the relative error over the fit points (more channels never run faster)."""
        from scipy.optimize import nnls

        from flexslim.spaces import cost_terms

        rows = [cost_terms(self.arch, p.widths) for p in self.fit_points]
        self.terms = sorted({k for r in rows for k in r})
        x = np.array([[1.0] + [float(r.get(k, 0.0)) for k in self.terms] for r in rows])
        y = np.array([p.ms for p in self.fit_points])
        scale = np.abs(x).max(axis=0)
        scale[scale == 0] = 1.0
        # relative error: divide each row by its target
        sol, _ = nnls((x / scale) / y[:, None], np.ones_like(y))
        sol = sol / scale
        self.intercept, self.coef = float(sol[0]), [float(v) for v in sol[1:]]

    # -- persistence ------------------------------------------------------------------------------
    def key(self) -> dict:
        """What a table is only valid for: the structure it was measured on and the runtime settings."""
        s = self.settings
        return {
            "structure": _structure(self.arch),
            "provider": self.provider,
            "batch": s.batch,
            "threads": s.threads,
            "percentile": s.percentile,
        }

    def to_dict(self) -> dict:
        return {
            "version": TABLE_VERSION,
            "key": self.key(),
            "host": self.host,
            "runtime": self.runtime,
            "settings": asdict(self.settings),
            "arch": self.arch.to_dict(),
            "terms": self.terms,
            "coef": self.coef,
            "intercept": self.intercept,
            "region": self.region,
            "floor_ms": self.floor_ms,
            "error": self.error_summary(),
            "measure_seconds": self.measure_seconds,
            "fit_points": [asdict(p) for p in self.fit_points],
            "holdout_points": [asdict(p) for p in self.holdout_points],
        }

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        """Read a latency.json; a missing, foreign or corrupt file is BadInput naming it."""
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"latency table {path} does not exist")
        try:
            d = json.loads(path.read_text())
            if d.get("version") != TABLE_VERSION:
                raise ValueError(f"unsupported version {d.get('version')!r}")
            model = cls(
                arch=Arch.from_dict(d["arch"], str(path)),
                settings=LatencyConfig(**d["settings"]),
                provider=d["key"]["provider"],
                runtime=d["runtime"],
                host=d["host"],
                terms=list(d["terms"]),
                coef=[float(c) for c in d["coef"]],
                intercept=float(d["intercept"]),
                region={k: list(v) for k, v in d["region"].items()},
                fit_points=[Point(**p) for p in d["fit_points"]],
                holdout_points=[Point(**p) for p in d["holdout_points"]],
                floor_ms=float(d["floor_ms"]),
                measure_seconds=float(d.get("measure_seconds", 0.0)),
            )
        except BadInput:
            raise
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
            raise BadInput(f"{path} is not a flexslim latency table ({type(err).__name__}: {err})") from None
        return model

    def check_compatible(self, arch: Arch, settings: LatencyConfig, where: str) -> None:
        """BadInput unless this table was measured on `arch`'s structure at the recipe's batch and threads."""
        if _structure(self.arch) != _structure(arch):
            raise BadInput(
                f"{where} was measured on another network structure; profile this recipe "
                "(`flexslim profile --recipe ...`)"
            )
        if (self.settings.batch, self.settings.threads) != (settings.batch, settings.threads):
            raise BadInput(
                f"{where} was measured at batch {self.settings.batch}, threads {self.settings.threads}; "
                f"the recipe asks batch {settings.batch}, threads {settings.threads}"
            )


def _structure(arch: Arch) -> dict:
    d = arch.to_dict()
    d.pop("widths")
    d.pop("dataset")
    d.pop("normalization")
    d.pop("class_names", None)
    return d


# -- measuring ------------------------------------------------------------------------------------
def measure(arch: Arch, widths: dict[str, int], settings: LatencyConfig, seed: int = 0):
    """Export the dense network at `widths` and time it on the deployment runtime, in the isolated timing
    process (see runtime.isolated_pool) -> runtime.Timing."""
    from flexslim.export import onnx_bytes
    from flexslim.runtime import time_isolated
    from flexslim.spaces import build_network

    torch.manual_seed(seed)
    net = build_network(arch, widths).eval()
    s = settings
    return time_isolated(
        onnx_bytes(net, arch.input_shape, fast=True),
        s.provider,
        s.threads,
        s.batch,
        s.warmup,
        s.runs,
        s.percentile,
        seed,
        s.min_seconds,
    )


def _sample(rng: random.Random, region: dict[str, list[int]], round_to: int) -> dict[str, int]:
    out = {}
    for stage, (lo, hi) in region.items():
        lo_k, hi_k = -(-lo // round_to), hi // round_to
        out[stage] = max(lo, round_to * rng.randint(lo_k, max(lo_k, hi_k)))
    return out


def _measure_points(arch, width_sets, settings, reporter, what) -> tuple[list[Point], str, str]:
    points, provider, runtime = [], "cpu", ""
    reporter.start(what, len(width_sets))
    for i, w in enumerate(width_sets):
        t = measure(arch, w, settings, seed=i)
        points.append(Point(dict(w), t.at_percentile_ms, t.p50_ms))
        provider, runtime = t.provider, t.runtime
        reporter.advance(f"{t.at_percentile_ms:.4f} ms  {w}")
    reporter.stop()
    return points, provider, runtime


def profile(
    arch: Arch,
    settings: LatencyConfig,
    min_width: int,
    round_to: int,
    hi: dict[str, int] | None = None,
    seed: int = 0,
    reporter: Reporter | None = None,
) -> LatencyModel:
    """Measure the narrowest network, the recipe's own, and random networks up to `hi` (default: twice the
    recipe's widths); fit on `settings.samples` of them and keep `settings.holdout` aside to report the error."""
    reporter = reporter or Reporter()
    if settings.samples < 3:
        raise BadInput(f"latency.samples must be >= 3 to fit a model, got {settings.samples}")
    hi = hi or {s: max(2 * w, min_width + round_to) for s, w in arch.widths.items()}
    region = {s: [min_width, int(hi[s])] for s in arch.widths}
    rng = random.Random(seed)
    floor = {s: min_width for s in arch.widths}
    fit_sets = [floor, dict(arch.widths), {s: region[s][1] for s in region}]
    fit_sets += [_sample(rng, region, round_to) for _ in range(max(0, settings.samples - len(fit_sets)))]
    hold_sets = [_sample(rng, region, round_to) for _ in range(settings.holdout)]
    t0 = time.perf_counter()
    fit_pts, provider, runtime = _measure_points(arch, fit_sets, settings, reporter, "latency: fit networks")
    hold_pts, _, _ = _measure_points(arch, hold_sets, settings, reporter, "latency: hold-out networks")
    model = LatencyModel(
        arch=arch,
        settings=settings,
        provider=provider,
        runtime=runtime,
        host=platform.node(),
        region=region,
        fit_points=fit_pts,
        holdout_points=hold_pts,
        floor_ms=fit_pts[0].ms,
    )
    model.fit()
    model.measure_seconds = time.perf_counter() - t0
    return model


def extend(
    model: LatencyModel,
    widths: dict[str, int],
    round_to: int,
    samples: int = 6,
    seed: int = 1,
    reporter: Reporter | None = None,
) -> bool:
    """Grow the measured region to hold `widths` (with 25% headroom), measure there, refit. False if covered."""
    if model.covers(widths):
        return False
    for s, w in widths.items():
        lo, hi = model.region[s]
        if w > hi:
            hi = int(round_to * -(-int(w * 1.25) // round_to))
        model.region[s] = [min(lo, int(w)), hi]  # below the region too (a table measured with a larger min_width)
    rng = random.Random(seed + len(model.fit_points))
    new_region = {
        s: [max(lo, min(hi, widths[s])), hi] if widths[s] > lo else [lo, hi] for s, (lo, hi) in model.region.items()
    }
    sets = [{s: model.region[s][1] for s in model.region}] + [
        _sample(rng, new_region, round_to) for _ in range(samples - 1)
    ]
    t0 = time.perf_counter()
    pts, _, _ = _measure_points(model.arch, sets, model.settings, reporter or Reporter(), "latency: extending")
    model.fit_points.extend(pts)
    model.fit()
    model.measure_seconds += time.perf_counter() - t0
    return True
