"""On-device latency model: fitted on whole dense networks measured on the deployment runtime (see
`profiling.py` for how they are measured and where), predicts differentiably from (expected) widths, and
reports its own error on networks it did not fit and the spread of repeated timings.

Model: latency_ms = b + sum_t c_t * term_t(eff(widths)), where the terms are the family's analytic cost terms
(MACs and output elements per feature-map resolution, see `spaces.cost_terms`) and eff(w) = block * ceil(w /
block) charges a width at the runtime's channel block (onnxruntime's CPU convolutions work on blocks of
channels: with a block of 16, 24 channels cost what 32 cost). The block is found by a probe, not assumed. A width
under the block may run another kernel (onnxruntime's CPU provider convolves 8 channels without its 16-channel
layout: 8/16/32/64 measured 0.069-0.075 ms where 16/16/32/64 measured 0.080-0.085 ms, which a table charging 8 as
16 predicts alike). Whether such widths are charged as the block or as themselves (`below_block`) is measured:
the narrowest network against the one with every stage at the block (`profiling.below_block`).
Coefficients come from a non-negative least-squares fit of the relative error (more channels never make a
network faster). Every point is the gate's own statistic, the percentile of per-sample latency on the
chosen onnxruntime provider, batch and thread count, as the median over `repeats` fresh sessions. In the
search the prediction is the expectation over each stage's option distribution (as FBNetV2 takes it over
its options): exact at whole widths, smooth in mu in between.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from flexslim.errors import BadInput
from flexslim.latency.runtime import relative_spread
from flexslim.models.arch import Arch
from flexslim.recipe import checks
from flexslim.recipe.schema import LatencyConfig
from flexslim.system.files import atomic_write_json

TABLE_VERSION = 2
NEAR = 0.12  # "near a budget": predicted within +-12% of it


@dataclass(frozen=True)
class Point:
    """One measured network: its widths and per-sample latency (ms) at the percentile and at p50.

    `ms` is the median over `repeats` (the percentile in each fresh session)."""

    widths: dict[str, int]
    ms: float
    p50_ms: float
    repeats: tuple[float, ...] = ()
    device: str = ""  # the fingerprint id of the device that measured it ("": made before points said)

    def spread(self) -> float | None:
        """Largest relative deviation of one session from the median (None with fewer than two sessions)."""
        return relative_spread(self.ms, self.repeats)


@dataclass
class LatencyModel:
    """The measured latency model of one family on one runtime setting (provider, batch, threads, percentile).

    latency_ms = intercept + sum_t coef_t * term_t(eff(widths)), fitted on `fit_points` and checked on
    `holdout_points` (networks it did not see, chosen near the budgets it was made for). `predict` takes
    whole widths or (expected, already effective) width tensors; `predict_expected` takes each stage's option
    distribution, so the search can differentiate it in mu. Saved as latency.json (`save`/`load`); `key()` says
    what a table is valid for.
    """

    arch: Arch  # the template: structure, input shape (its widths are not used)
    settings: LatencyConfig
    provider: str  # what actually ran
    runtime: str
    host: str
    block: int = 1  # channel block of the runtime (probe); widths are charged at block * ceil(w / block)
    below_block: str = "block"  # a width under the block is charged as the block ("block") or as itself ("width")
    probe: dict[str, float] = field(default_factory=dict)  # the probe's timings: width -> ms
    terms: list[str] = field(default_factory=list)
    coef: list[float] = field(default_factory=list)
    intercept: float = 0.0
    region: dict[str, list[int]] = field(default_factory=dict)  # stage -> [lo, hi] sampled widths
    fit_points: list[Point] = field(default_factory=list)
    holdout_points: list[Point] = field(default_factory=list)
    floor_ms: float = 0.0  # measured latency of the narrowest network (every stage at min_width)
    measure_seconds: float = 0.0
    budgets: list[float] = field(default_factory=list)  # the budgets its samples were concentrated at
    device: dict = field(default_factory=dict)  # who measured it (`fingerprint.measuring_device`; {}: not recorded)
    formats: dict[str, float] = field(default_factory=dict)  # int8: the format probe, fp32 | format -> ms

    # -- prediction -------------------------------------------------------------------------------------------
    def effective(self, widths: dict) -> dict:
        """Widths as the runtime charges them, decided by value: a whole number of channels (24 or 24.0) is a
        network's width and costs its channel block (block * ceil(w / block)); a fractional value (an expectation,
        e.g. mu during the search) or a tensor being differentiated is continuous and used as it is."""
        return {s: self._charged(w) for s, w in widths.items()}

    def _charged(self, w):
        if getattr(w, "requires_grad", False) or not float(w).is_integer():
            return w
        if self.below_block == "width" and float(w) < self.block:
            return float(w)
        return self.block * math.ceil(float(w) / self.block)

    def predict(self, widths: dict) -> torch.Tensor | float:
        """Predicted per-sample latency (ms); differentiable when the widths are tensors."""
        return self._linear(self.effective(widths))

    def predict_expected(self, distributions: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Prediction at the expected effective width of each stage, E[eff(f)] = sum_k w_k eff(f_k), from
        (options f_k, weights w_k) per stage: differentiable in whatever made the weights (mu)."""
        b = self.block

        def eff(f: torch.Tensor) -> torch.Tensor:
            padded = torch.ceil(f / b) * b
            return torch.where(f < b, f, padded) if self.below_block == "width" else padded

        return self._linear({s: (w * eff(f)).sum() for s, (f, w) in distributions.items()})

    def _linear(self, eff_widths: dict) -> torch.Tensor | float:
        from flexslim.models.families import cost_terms

        t = cost_terms(self.arch, eff_widths)
        total = self.intercept
        for name, c in zip(self.terms, self.coef):
            total = total + c * t.get(name, 0.0)
        return total

    def errors(self, points: list[Point] | None = None) -> list[float]:
        """Relative prediction errors (%) on the hold-out networks."""
        pts = self.holdout_points if points is None else points
        return [100.0 * abs(float(self.predict(p.widths)) - p.ms) / p.ms for p in pts]

    def noise(self) -> float:
        """Typical session-to-session spread of one network's timing (fraction): the median over measured points
        of each point's largest deviation from its median. It sets the budget's headroom."""
        spreads = [s for p in self.fit_points + self.holdout_points if (s := p.spread()) is not None]
        return statistics.median(spreads) if spreads else 0.0

    def error_summary(self) -> dict[str, float]:
        """Hold-out error {"holdout": n, "median_pct", "max_pct"}, the same over the hold-out networks near the
        table's budgets ("near_*"), and the timing spread "noise_pct"."""
        e = self.errors()
        out: dict[str, float] = {"holdout": len(e), "noise_pct": 100.0 * self.noise()}
        if e:
            out.update(median_pct=statistics.median(e), max_pct=max(e))
        near = [p for p in self.holdout_points if any(abs(p.ms / b - 1) <= NEAR for b in self.budgets)]
        if near:
            en = self.errors(near)
            out.update(near_holdout=len(en), near_median_pct=statistics.median(en), near_max_pct=max(en))
        return out

    def covers(self, widths: dict[str, int]) -> bool:
        """True when every stage's width lies in the sampled region (the fit interpolates there)."""
        return all(self.region[s][0] <= w <= self.region[s][1] for s, w in widths.items())

    def measured_elsewhere(self, device: dict) -> bool:
        """True when this table records a device other than `device` (`fingerprint.measuring_device`): its points
        must not be mixed with what `device` measures. A table that records none is taken as this device's."""
        mine = self.device.get("id", "")
        return bool(mine) and mine != device.get("id", "")

    def near(self, budget_ms: float) -> list[Point]:
        """Fit points whose measured latency lies within NEAR of `budget_ms`."""
        return [p for p in self.fit_points if abs(p.ms / budget_ms - 1) <= NEAR]

    # -- fitting ----------------------------------------------------------------------------------------------
    def fit(self) -> None:
        """Non-negative least squares of the relative error over the fit points (more channels never run faster)."""
        from scipy.optimize import nnls

        from flexslim.models.families import cost_terms

        rows = [cost_terms(self.arch, self.effective(p.widths)) for p in self.fit_points]
        self.terms = sorted({k for r in rows for k in r})
        x = np.array([[1.0] + [float(r.get(k, 0.0)) for k in self.terms] for r in rows])
        y = np.array([p.ms for p in self.fit_points])
        scale = np.abs(x).max(axis=0)
        scale[scale == 0] = 1.0
        sol, _ = nnls((x / scale) / y[:, None], np.ones_like(y))  # relative error: each row over its target
        sol = sol / scale
        self.intercept, self.coef = float(sol[0]), [float(v) for v in sol[1:]]

    # -- persistence ------------------------------------------------------------------------------------------
    def key(self) -> dict:
        """What a table is only valid for: the structure it was measured on and the runtime settings."""
        s = self.settings
        return {
            "structure": _structure(self.arch),
            "provider": self.provider,
            "batch": s.batch,
            "threads": s.threads,
            "percentile": s.percentile,
            "precision": s.precision,
            "int8_format": s.int8_format,
        }

    def to_dict(self) -> dict:
        """The latency.json content (versioned; measured points with their sessions)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("arch", "settings", "fit_points", "holdout_points")}
        return {
            "version": TABLE_VERSION,
            "key": self.key(),
            **d,
            "settings": asdict(self.settings),
            "arch": self.arch.to_dict(),
            "error": self.error_summary(),
            "fit_points": [asdict(p) for p in self.fit_points],
            "holdout_points": [asdict(p) for p in self.holdout_points],
        }

    def save(self, path: str | Path) -> Path:
        """Write latency.json atomically; returns the path."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        """Read a latency.json; a missing, foreign, old or corrupt file is BadInput naming it, and a number that is
        not finite or out of range (coefficients, points, floor, the `settings` block by the recipe's own rules) is
        BadInput naming the file and the key (see `check_table`)."""
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"latency table {path} does not exist")
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict):
                raise ValueError("expected a JSON object")
            if d.get("version") != TABLE_VERSION:
                raise ValueError(f"version {d.get('version')!r}, this flexslim reads {TABLE_VERSION}: re-profile")
            model = cls(
                arch=Arch.from_dict(d["arch"], str(path)),
                settings=_settings(d["settings"], path),
                provider=str(d["provider"]),
                runtime=str(d["runtime"]),
                host=str(d["host"]),
                block=d["block"],
                below_block=str(d.get("below_block", "block")),
                probe=dict(d["probe"]),
                terms=list(d["terms"]),
                coef=list(d["coef"]),
                intercept=d["intercept"],
                region=dict(d["region"]),
                fit_points=[_point(p) for p in d["fit_points"]],
                holdout_points=[_point(p) for p in d["holdout_points"]],
                floor_ms=d["floor_ms"],
                measure_seconds=d.get("measure_seconds", 0.0),
                budgets=list(d.get("budgets", [])),
                device=_device(d.get("device", {})),
                formats={str(k): _ms(v, checks.table_key(path, f"formats.{k}")) for k, v in d.get("formats", {}).items()},
            )
        except BadInput:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as err:
            raise BadInput(f"{path} is not a flexslim latency table ({type(err).__name__}: {err})") from None
        return check_table(model, path)

    def check_compatible(self, arch: Arch, settings: LatencyConfig, where: str) -> None:
        """BadInput unless this table was measured on `arch`'s structure with the recipe's runtime settings: the
        provider that ran (the recipe's, resolved here: auto is cuda where onnxruntime's CUDA provider can run),
        the percentile, the batch and the threads. The message names both values of every setting that differs."""
        if _structure(self.arch) != _structure(arch):
            raise BadInput(
                f"{where} was measured on another network structure; profile this recipe "
                "(`flexslim profile --recipe ...`)"
            )
        s = self.settings
        differ = [
            f"{name} {mine} (the recipe's latency.{name}: {theirs})"
            for name, mine, theirs in (
                ("batch", s.batch, settings.batch),
                ("threads", s.threads, settings.threads),
                ("percentile", f"{s.percentile:g}", f"{settings.percentile:g}"),
                ("precision", s.precision, settings.precision),
            )
            if mine != theirs
        ]
        if s.precision == "int8" == settings.precision and settings.int8_format not in ("auto", s.int8_format):
            differ.append(f"int8_format {s.int8_format} (the recipe's latency.int8_format: {settings.int8_format})")
        wanted = provider_that_runs(settings.provider)
        if self.provider != wanted:
            shown = wanted if settings.provider == wanted else f"{settings.provider}, which runs {wanted} here"
            differ.insert(0, f"provider {self.provider} (the recipe's latency.provider: {shown})")
        if differ:
            raise BadInput(
                f"{where} was measured at {', '.join(differ)}: a table only serves the settings it was measured "
                "with; profile this recipe (`flexslim profile --recipe ... --out FILE`) or drop --latency-table"
            )


def check_table(model: LatencyModel, path: str | Path) -> LatencyModel:
    """`model` (read from `path`) with every number converted and in range, else BadInput naming the file and the
    key: the block, probe timings, coefficients and intercept (finite, >= 0: the fit is non-negative), the sampled
    region and every point (widths of the table's stages, milliseconds finite and > 0), the floor, the budgets,
    and the terms (the family's cost terms, one coefficient each; the predictions finite). A table may hold no
    points (made by hand: the run measures near its budget). Tables are data from outside: they are checked
    like recipes."""
    key = lambda k: checks.table_key(path, k)  # noqa: E731
    stages = set(model.arch.widths)
    model.block = checks.integer(model.block, key("block"), low=1, cap=checks.MAX_WIDTH)
    if model.below_block not in ("block", "width"):
        where = key("below_block")
        raise BadInput(f'{where.label} must be "block" or "width", got {model.below_block!r}; {where.fix}')
    model.probe = {str(w): _ms(v, key(f"probe.{w}")) for w, v in model.probe.items()}
    if len(model.coef) != len(model.terms):
        raise _table_error(path, f"{len(model.coef)} coef for {len(model.terms)} terms")
    model.coef = [checks.non_negative(c, key(f"coef[{i}]")) for i, c in enumerate(model.coef)]
    model.intercept = checks.non_negative(model.intercept, key("intercept"))
    if set(model.region) != stages:
        raise _stages_error(path, "region", sorted(model.region), stages)
    model.region = {s: _range(v, key(f"region.{s}")) for s, v in model.region.items()}
    for name, points in (("fit_points", model.fit_points), ("holdout_points", model.holdout_points)):
        points[:] = [_checked_point(p, f"{name}[{i}]", path, stages) for i, p in enumerate(points)]
    model.floor_ms = _ms(model.floor_ms, key("floor_ms"))
    model.measure_seconds = checks.non_negative(model.measure_seconds, key("measure_seconds"))
    model.budgets = [checks.budget_ms(b, key(f"budgets[{i}]")) for i, b in enumerate(model.budgets)]
    from flexslim.models.families import cost_terms

    nets = {"the table's network": dict(model.arch.widths)} | {f"fit_points[{i}]": p.widths for i, p in
                                                               enumerate(model.fit_points)}  # fmt: skip
    known = {t for w in nets.values() for t in cost_terms(model.arch, model.effective(w))}
    for i, t in enumerate(model.terms):
        if not isinstance(t, str) or t not in known:
            raise _table_error(path, f"terms[{i}] = {str(t)[:40]!r} is not a cost term of this network")
    for where, w in nets.items():
        if not math.isfinite(float(model.predict(w))):
            raise _table_error(path, f"coef predicts a latency that is not finite for {where}")
    return model


def _settings(d: object, path: str | Path) -> LatencyConfig:
    """The table's `settings` block checked by the recipe's own rules for [latency] (a hostile `near` or `runs`
    would hang the refinement), the values converted."""
    from flexslim.recipe.rules import RULES, _choices

    if not isinstance(d, dict):
        raise ValueError("settings must be a JSON object")
    if isinstance(d.get("precision"), (int, float)) and not isinstance(d.get("precision"), bool):
        d = {("tolerance" if k == "precision" else k): v for k, v in d.items()}  # a table of before 2026-12
    named = _choices()
    known = {f.name: f.default for f in fields(LatencyConfig)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise _table_error(path, f"settings.{unknown[0][:40]} is not a [latency] key")
    out = {}
    for name, value in d.items():
        origin = checks.table_key(path, f"settings.{name}")
        if f"latency.{name}" in named:  # provider, precision, int8_format
            out[name] = checks.choice(value, origin, named[f"latency.{name}"])
        elif isinstance(known[name], bool):  # probe: a switch
            if not isinstance(value, bool):
                raise BadInput(f"{origin.label} = {str(value)[:40]!r}: must be true or false; {origin.fix}")
            out[name] = value
        else:
            out[name] = RULES[f"latency.{name}"](value, origin)
    return LatencyConfig(**out)


def _ms(value: object, origin: checks.Origin) -> float:
    return checks.finite(value, origin, low=0.0, low_open=True, unit=" of milliseconds")


def _width(value: object, origin: checks.Origin) -> int:
    return checks.count(value, origin, cap=checks.MAX_WIDTH)


def _range(value: object, origin: checks.Origin) -> list[int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise BadInput(f"{origin.label} = {str(value)[:40]}: must be [low, high] widths; {origin.fix}")
    lo, hi = (_width(v, origin) for v in value)
    if lo > hi:
        raise BadInput(f"{origin.label} = {[lo, hi]}: must be [low, high] with low <= high; {origin.fix}")
    return [lo, hi]


def _checked_point(p: Point, where: str, path: str | Path, stages: set[str]) -> Point:
    key = lambda k: checks.table_key(path, f"{where}.{k}")  # noqa: E731
    if set(p.widths) != stages:
        raise _stages_error(path, f"{where}.widths", sorted(p.widths), stages)
    return Point(
        {s: _width(w, key(f"widths.{s}")) for s, w in p.widths.items()},
        _ms(p.ms, key("ms")),
        _ms(p.p50_ms, key("p50_ms")),
        tuple(_ms(r, key(f"repeats[{i}]")) for i, r in enumerate(p.repeats)),
        p.device,
    )


def _stages_error(path, key: str, got: list, stages: set[str]) -> BadInput:
    shown = ", ".join(str(g)[:20] for g in got[:8])
    return _table_error(path, f"{key} names stages [{shown}], the table's network has [{', '.join(sorted(stages))}]")


def _table_error(path, what: str) -> BadInput:
    return BadInput(f"latency table {path}: {what}; {checks.table_key(path, '').fix}")


def provider_that_runs(provider: str) -> str:
    """The provider a recipe's choice (auto | cpu | cuda) runs on here, 'cpu' or 'cuda': what a table measured
    with it records as its `provider`."""
    from flexslim.latency.runtime import provider_list

    return "cuda" if provider_list(provider)[0] == "CUDAExecutionProvider" else "cpu"


def _structure(arch: Arch) -> dict:
    d = arch.to_dict()
    for key in ("widths", "dataset", "normalization", "class_names"):
        d.pop(key, None)
    return d


def _point(d: dict) -> Point:
    return Point(dict(d["widths"]), d["ms"], d["p50_ms"], tuple(d.get("repeats", ())), _text(d.get("device", "")))


def _device(d: object) -> dict:
    """A table's `device` record: string values only (ValueError otherwise)."""
    if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
        raise ValueError("device: expected an object of strings")
    return dict(d)


def _text(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"device: expected a string, got {type(v).__name__}")
    return v


def with_grid(recipe, latency: LatencyModel):
    """The recipe as the table `latency` serves it: `model.round_to` 0 (auto) becomes the runtime's channel block,
    at least 8, and an int8 format left at auto the one the table measured (its probe chose it)."""
    s, measured = recipe.latency, latency.settings
    if s.precision == "int8" == measured.precision and s.int8_format == "auto" != measured.int8_format:
        recipe = replace(recipe, latency=replace(s, int8_format=measured.int8_format))
    if recipe.model.round_to:
        return recipe
    model = replace(recipe.model, round_to=max(8, latency.block))
    return replace(recipe, model=model)
