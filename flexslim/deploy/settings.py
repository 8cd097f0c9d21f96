"""The gate's settings rules: where each measurement setting may come from (the arguments/flags, else the model's
`flexslim.*` metadata, else the defaults), which metadata values would loosen the gate and are refused, and the
`Measurement` the gate times with. Read by `flexslim.deploy.gate`; the contract is in its docstring.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flexslim.errors import BadInput
from flexslim.latency.runtime import DEFAULT_TIMEOUT, GATE_SECONDS, TimingPlan
from flexslim.recipe import checks
from flexslim.recipe.choices import DATASETS, PROVIDERS

DEFAULT_BATCH = 32


# setting -> (metadata key that may fill it, the flag that overrides it, its check)
METADATA_SETTINGS: dict[str, tuple[str, str, Callable]] = {
    "budget_ms": ("flexslim.budget_ms", "--latency-ms", checks.budget_ms),
    "percentile": ("flexslim.latency_percentile", "--percentile", checks.percentile),
    "threads": ("flexslim.latency_threads", "--threads", checks.threads),
    "batch": ("flexslim.latency_batch", "--batch", checks.batch),
    "dataset": ("flexslim.dataset", "--dataset", lambda v, o: checks.choice(v, o, DATASETS)),
}


DEFAULTS = {"budget_ms": None, "percentile": 90.0, "threads": 0, "batch": DEFAULT_BATCH, "dataset": None}


@dataclass(frozen=True)
class Measurement:
    """How the gate times the model. `batch`, `percentile` and `threads` left at None come from the model's metadata
    (describing only, never loosening) or the defaults (the model's fixed batch or 32, p90, the runtime's threads).

    Attributes:
        batch: samples per timed pass (latency is per sample: time of one pass / batch).
        percentile: the percentile of the timed passes the budget applies to.
        threads: onnxruntime intra-op threads (0 = the runtime's default).
        warmup: untimed passes first.
        runs: at least this many timed passes.
        min_seconds: at least this many seconds of timed passes.
        timeout: seconds the measurement may take (warm-up and timed passes); past it the gate fails (exit 1).
        tolerance: > 0: timing may stop before `min_seconds` once the percentile's 95% interval is within
            +-tolerance of it (`latency.statistic`); the report then says so. 0: the full `min_seconds`.
    """

    batch: int | None = None
    percentile: float | None = None
    threads: int | None = None
    warmup: int = 10
    runs: int = 50
    min_seconds: float = GATE_SECONDS
    timeout: float = DEFAULT_TIMEOUT
    tolerance: float = 0.0

    @classmethod
    def of_run(cls, latency: dict | None) -> Measurement:
        """The settings a run measured its budget with (its recipe's `latency` section: batch, threads,
        percentile, timeout; a record without `timeout` gets DEFAULT_TIMEOUT), as explicit settings: a job gating
        its own model with them loosens nothing."""
        lat = latency or {}
        return cls(
            batch=lat.get("batch"),
            percentile=lat.get("percentile"),
            threads=lat.get("threads"),
            timeout=lat.get("timeout", DEFAULT_TIMEOUT),
        )

    def plan(self, s: GateSettings) -> TimingPlan:
        """The timing plan of these passes with the resolved batch, percentile and threads (`resolve_settings`)."""
        return TimingPlan(
            batch=s.batch,
            warmup=self.warmup,
            runs=self.runs,
            percentile=s.percentile,
            threads=s.threads,
            min_seconds=self.min_seconds,
            timeout=self.timeout,
            precision=self.tolerance,
        )

    def flags(self) -> list[str]:
        """The `flexslim validate` flags for the settings that differ from the defaults (a child process that runs
        the gate's command line measures with the same settings)."""
        default = Measurement()
        return [
            a
            for name, flag_name in _FLAGS.items()
            if getattr(self, name) != getattr(default, name)
            for a in (flag_name, str(getattr(self, name)))
        ]


_FLAGS = {
    "batch": "--batch",
    "percentile": "--percentile",
    "threads": "--threads",
    "warmup": "--warmup",
    "runs": "--runs",
    "min_seconds": "--min-seconds",
    "timeout": "--timeout",
    "tolerance": "--tolerance",
}


@dataclass(frozen=True)
class GateSettings:
    """What the gate measures with, after arguments, metadata and defaults (in that order) and their checks."""

    budget_ms: float | None
    percentile: float
    threads: int
    batch: int
    dataset: str | None  # None: no accuracy is computed
    fixed_batch: int | None  # the model's own batch dimension, when it is fixed
    from_metadata: dict[str, float | int | str] = field(default_factory=dict)  # the values the model supplied


def _checked_arguments(latency_ms, min_accuracy, dataset, provider: str, m: Measurement) -> dict:
    """The settings the arguments give (setting -> value or None), every explicit argument (flag) checked before the
    model is even read."""
    args = {
        "budget_ms": latency_ms,
        "percentile": m.percentile,
        "threads": m.threads,
        "batch": m.batch,
        "dataset": dataset,
    }
    for name, value in args.items():
        if value is not None:
            _, flag_name, check = METADATA_SETTINGS[name]
            check(value, checks.flag(flag_name))
    if min_accuracy is not None:
        checks.fraction(min_accuracy, checks.flag("--min-accuracy"))
    checks.choice(provider, checks.flag("--provider"), PROVIDERS)
    checks.warmup(m.warmup, checks.flag("--warmup"))
    checks.runs(m.runs, checks.flag("--runs"))
    checks.min_seconds(m.min_seconds, checks.flag("--min-seconds"))
    checks.timeout(m.timeout, checks.flag("--timeout"))
    checks.tolerance(m.tolerance, checks.flag("--tolerance"))
    return args


def resolve_settings(
    args: dict, meta: dict[str, str], input_dims: list, model: str | Path, accuracy_asked: bool = True
) -> GateSettings:
    """Arguments win; missing ones come from checked metadata, then defaults. Metadata only describes: a value that
    would make the measurement laxer than the default is BadInput naming the flag that allows it. A model's fixed
    batch wins over the default; an argument batch that contradicts it, or metadata that does, is BadInput. The
    dataset is resolved only when accuracy is asked for (a latency-only gate touches no dataset)."""
    values, from_meta = {}, {}
    for name, (key, flag_name, check) in METADATA_SETTINGS.items():
        given = check(meta[key], checks.metadata_key(key, flag_name)) if key in meta else None  # checked, used or not
        if name == "dataset" and not accuracy_asked:
            values[name] = None
        elif args[name] is not None:
            values[name] = check(args[name], checks.flag(flag_name))
        elif given is not None:
            values[name] = from_meta[name] = given
        else:
            values[name] = DEFAULTS[name]
    sample = tuple(input_dims[1:])
    static = all(isinstance(d, int) and d > 0 for d in sample)
    fixed = input_dims[0] if isinstance(input_dims[0], int) and input_dims[0] > 0 else None
    if fixed is not None:
        checks.batch(
            fixed,
            checks.Origin(f"{model}: input batch dimension", "export it with a smaller or dynamic batch"),
            sample if static else None,
        )
        if args["batch"] is not None and args["batch"] != fixed:
            raise BadInput(f"{model} has a fixed batch of {fixed}; drop --batch or pass --batch {fixed}")
        _refuse_loosening(from_meta, fixed, model)
        values["batch"] = fixed
        from_meta.pop("batch", None)  # it said what the model says
    else:
        if static:
            checks.batch(values["batch"], _batch_origin(args, from_meta), sample)
        _refuse_loosening(from_meta, None, model)
    return GateSettings(fixed_batch=fixed, from_metadata=from_meta, **values)


def available_cpus() -> int:
    """CPUs this process may run on: onnxruntime's default thread count (one per core) is at most this."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _refuse_loosening(from_meta: dict, fixed_batch: int | None, model: str | Path) -> None:
    """BadInput when a value the metadata supplied would make the measurement laxer than the gate's defaults: a
    lower percentile, a larger batch (or one that is not the model's fixed batch), more threads than the CPUs."""
    looser = []
    if "percentile" in from_meta and from_meta["percentile"] < DEFAULTS["percentile"]:
        looser.append(("percentile", f"the gate's default is p{DEFAULTS['percentile']:g}"))
    if "threads" in from_meta and from_meta["threads"] > available_cpus():
        looser.append(("threads", f"more than the {available_cpus()} CPUs the runtime's default uses"))
    if "batch" in from_meta:
        key, b = METADATA_SETTINGS["batch"][0], from_meta["batch"]
        if fixed_batch is not None and b != fixed_batch:
            raise BadInput(
                f"model metadata {key}={b} does not describe {model}: its input has a fixed batch of {fixed_batch}; "
                f"re-export it with {key}={fixed_batch} or without {key}"
            )
        if fixed_batch is None and b > DEFAULT_BATCH:
            looser.append(
                ("batch", f"the gate's default is batch {DEFAULT_BATCH}; a larger batch is faster per sample")
            )
    if looser:
        name, why = looser[0]
        key, flag_name, _ = METADATA_SETTINGS[name]
        v = from_meta[name]
        shown = f"{v:g}" if isinstance(v, float) else str(v)
        raise BadInput(
            f"model metadata {key}={shown} would loosen the gate: pass {flag_name} {shown} to allow it ({why})"
        )


def _batch_origin(args: dict, from_meta: dict) -> checks.Origin:
    if args["batch"] is not None:
        return checks.flag("--batch")
    if "batch" in from_meta:
        return checks.metadata_key(METADATA_SETTINGS["batch"][0], "--batch")
    return checks.Origin(f"default batch {DEFAULT_BATCH}", "pass a smaller --batch")


def _class_names(meta: dict[str, str]) -> list[str]:
    """The model's `flexslim.class_names` (a JSON list of names), [] when absent."""
    key = "flexslim.class_names"
    if key not in meta:
        return []
    try:
        names = json.loads(meta[key])
    except ValueError:
        names = None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise BadInput(f"model metadata {key} is not a JSON list of class names; re-export the model")
    return names
