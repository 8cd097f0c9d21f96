"""The gate: per-sample latency (and accuracy, when a dataset is known) of ANY ONNX image classifier
against a budget -> Report (JSON, JUnit XML). Also the library call behind `flexslim validate`:

    report = flexslim.validate("model.onnx", latency_ms=0.3, min_accuracy=0.94)
    assert report.passed, report.summary()

Budget, dataset, batch, thread count and percentile come from the arguments or, for flexslim models,
from the `flexslim.*` metadata written at export (arguments win).
"""

from __future__ import annotations

import json
import platform
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flexslim.errors import BadInput
from flexslim.latency.runtime import GATE_SECONDS, Timing, make_session, time_session
from flexslim.recipe import checks
from flexslim.recipe.choices import DATASETS, PROVIDERS
from flexslim.system.files import atomic_write_bytes, atomic_write_json

DEFAULT_BATCH = 32


@dataclass(frozen=True)
class Check:
    name: str  # latency | accuracy
    passed: bool
    measured: float
    limit: float
    unit: str  # ms | fraction
    message: str


@dataclass(frozen=True)
class Report:
    model: str
    requested_provider: str
    timing: Timing
    budget_ms: float | None
    dataset: str | None
    accuracy: float | None
    num_test: int
    min_accuracy: float | None
    checks: tuple[Check, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    host: str = field(default_factory=platform.node)
    from_metadata: dict[str, float | int | str] = field(default_factory=dict)  # settings the model's metadata gave

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def latency_ms(self) -> float:
        """The gate's statistic: per-sample latency at the report's percentile."""
        return self.timing.at_percentile_ms

    def summary(self) -> str:
        parts = [f"{c.name}: {c.message}" for c in self.checks] or [
            f"latency p{self.timing.percentile:g} {self.latency_ms:.4f} ms/sample (no budget)"
        ]
        given = ", ".join(f"{k}={v}" for k, v in self.from_metadata.items())
        return (
            ("PASS" if self.passed else "FAIL")
            + " - "
            + "; ".join(parts)
            + (f" [from the model's metadata: {given}]" if given else "")
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "passed": self.passed,
            "provider": self.timing.provider,
            "requested_provider": self.requested_provider,
            "batch": self.timing.batch,
            "input_shape": list(self.timing.input_shape),
            "threads": self.timing.threads,
            "percentile": self.timing.percentile,
            "latency_ms": self.latency_ms,
            "p50_ms": self.timing.p50_ms,
            "p90_ms": self.timing.p90_ms,
            "mean_ms": self.timing.mean_ms,
            "all_passes_ms": self.timing.all_passes_ms,
            "timed_runs": self.timing.runs,
            "windows": self.timing.windows,
            "quiet_windows": self.timing.quiet_windows,
            "warmup_runs": self.timing.warmup,
            "runtime": self.timing.runtime,
            "budget_ms": self.budget_ms,
            "dataset": self.dataset,
            "accuracy": self.accuracy,
            "num_test": self.num_test,
            "min_accuracy": self.min_accuracy,
            "checks": [asdict(c) for c in self.checks],
            "host": self.host,
            "metadata": {k: v for k, v in self.metadata.items() if k != "flexslim.arch"},
            "from_metadata": dict(self.from_metadata),
        }

    def write_json(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    def write_junit(self, path: str | Path) -> Path:
        suite = ET.Element(
            "testsuite",
            name="flexslim.validate",
            tests=str(len(self.checks)),
            failures=str(sum(not c.passed for c in self.checks)),
            errors="0",
        )
        for c in self.checks:
            case = ET.SubElement(suite, "testcase", classname=f"flexslim.validate.{Path(self.model).name}", name=c.name)
            if not c.passed:
                ET.SubElement(case, "failure", message=c.message, type="GateFailed").text = c.message
            ET.SubElement(case, "system-out").text = json.dumps(
                {"measured": c.measured, "limit": c.limit, "unit": c.unit, "provider": self.timing.provider}
            )
        root = ET.Element("testsuites")
        root.append(suite)
        ET.indent(root)
        return atomic_write_bytes(path, ET.tostring(root, encoding="utf-8", xml_declaration=True))


def load_onnx(path: str | Path):
    """Read and check an ONNX file; anything unreadable is BadInput (exit 2), never a traceback."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"model file {path} does not exist")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as err:  # noqa: BLE001 - protobuf and checker raise many types for a corrupt file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadInput(f"{path} is not a valid ONNX model ({first[:160]})") from None
    if not proto.graph.node:
        raise BadInput(f"{path} is not a valid ONNX model (empty graph)")
    return proto


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
class GateSettings:
    """What the gate measures with, after arguments, metadata and defaults (in that order) and their checks."""

    budget_ms: float | None
    percentile: float
    threads: int
    batch: int
    dataset: str | None
    fixed_batch: int | None  # the model's own batch dimension, when it is fixed
    from_metadata: dict[str, float | int | str] = field(default_factory=dict)  # the values the model supplied


def validate(
    model: str | Path,
    latency_ms: float | None = None,
    min_accuracy: float | None = None,
    provider: str = "auto",
    batch: int | None = None,
    percentile: float | None = None,
    dataset: str | None = None,
    data: str | Path | None = None,
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 50,
    min_seconds: float = GATE_SECONDS,
) -> Report:
    """Measure an ONNX classifier and judge it against a latency budget and/or an accuracy target.

    Settings not passed come from the model's `flexslim.*` metadata (checked like the arguments, and listed in
    `Report.from_metadata`), else from the defaults. Every setting is checked before anything is measured.
    """
    args = {"budget_ms": latency_ms, "percentile": percentile, "threads": threads, "batch": batch, "dataset": dataset}
    _check_arguments(args, min_accuracy, provider, warmup, runs, min_seconds)
    proto = load_onnx(model)
    meta = {p.key: p.value for p in proto.metadata_props}
    settings = resolve_settings(args, meta, _input_dims(proto, model), model)
    if min_accuracy is not None and settings.dataset is None:
        raise BadInput(f"--min-accuracy needs a dataset: pass --dataset ({', '.join(DATASETS)}); the model names none")
    del proto
    session = _open_session(model, provider, settings.threads)
    timing = time_session(
        session,
        settings.batch,
        warmup=warmup,
        runs=runs,
        percentile=settings.percentile,
        threads=settings.threads,
        min_seconds=min_seconds,
    )
    accuracy, n_test = None, 0
    # a folder dataset can only be read where --data names it (export's gate has none): then no accuracy check
    unreadable = settings.dataset == "folder" and data is None and min_accuracy is None
    if settings.dataset is not None and not unreadable:
        names = json.loads(meta.get("flexslim.class_names", "[]"))
        accuracy, n_test = _accuracy(session, settings.dataset, data, timing.input_shape, settings.fixed_batch, names)
    judged = _judge(timing, settings, accuracy, n_test, min_accuracy)
    return Report(
        str(model),
        provider,
        timing,
        settings.budget_ms,
        settings.dataset,
        accuracy,
        n_test,
        min_accuracy,
        judged,
        meta,
        from_metadata=dict(settings.from_metadata),
    )


def _check_arguments(args: dict, min_accuracy, provider: str, warmup, runs, min_seconds) -> None:
    """Check the explicit arguments (flags) before the model is even read."""
    for name, value in args.items():
        if value is not None:
            _, flag_name, check = METADATA_SETTINGS[name]
            check(value, checks.flag(flag_name))
    if min_accuracy is not None:
        checks.fraction(min_accuracy, checks.flag("--min-accuracy"))
    checks.choice(provider, checks.flag("--provider"), PROVIDERS)
    checks.warmup(warmup, checks.flag("--warmup"))
    checks.runs(runs, checks.flag("--runs"))
    checks.min_seconds(min_seconds, checks.flag("--min-seconds"))


def resolve_settings(args: dict, meta: dict[str, str], input_dims: list, model: str | Path) -> GateSettings:
    """Arguments win; missing ones come from checked metadata, then defaults. A model's fixed batch wins over
    metadata and defaults; an argument batch that contradicts it is BadInput."""
    values, from_meta = {}, {}
    for name, (key, flag_name, check) in METADATA_SETTINGS.items():
        if args[name] is not None:
            values[name] = check(args[name], checks.flag(flag_name))
        elif key in meta:
            values[name] = from_meta[name] = check(meta[key], checks.metadata_key(key, flag_name))
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
        values["batch"] = fixed
        from_meta.pop("batch", None)
    elif static:
        checks.batch(values["batch"], _batch_origin(args, from_meta), sample)
    return GateSettings(fixed_batch=fixed, from_metadata=from_meta, **values)


def _batch_origin(args: dict, from_meta: dict) -> checks.Origin:
    if args["batch"] is not None:
        return checks.flag("--batch")
    if "batch" in from_meta:
        return checks.metadata_key(METADATA_SETTINGS["batch"][0], "--batch")
    return checks.Origin(f"default batch {DEFAULT_BATCH}", "pass a smaller --batch")


def _open_session(model: str | Path, provider: str, threads: int):
    try:
        return make_session(model, provider, threads)
    except BadInput:
        raise
    except Exception as err:  # noqa: BLE001 - onnxruntime refuses graphs it cannot run
        raise BadInput(f"onnxruntime cannot load {model}: {str(err).splitlines()[0][:160]}") from None


def _judge(timing: Timing, s: GateSettings, accuracy: float | None, n_test: int, min_accuracy) -> tuple[Check, ...]:
    """The latency check (when there is a budget) and the accuracy check (when there is a target)."""
    judged = []
    if s.budget_ms is not None:
        ok = timing.at_percentile_ms <= s.budget_ms
        source = " from the model's metadata" if "budget_ms" in s.from_metadata else ""
        judged.append(
            Check(
                "latency",
                ok,
                timing.at_percentile_ms,
                s.budget_ms,
                "ms",
                f"p{s.percentile:g} {timing.at_percentile_ms:.4f} ms/sample {'<=' if ok else '>'} budget "
                f"{s.budget_ms:g} ms{source} ({timing.provider}, batch {timing.batch})",
            )
        )
    if min_accuracy is not None:
        ok = accuracy >= min_accuracy
        judged.append(
            Check(
                "accuracy",
                ok,
                accuracy,
                min_accuracy,
                "fraction",
                f"{accuracy:.4f} {'>=' if ok else '<'} {min_accuracy:g} on {s.dataset} test ({n_test} images)",
            )
        )
    return tuple(judged)


def _input_dims(proto, path) -> list:
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise BadInput(f"{path} has {len(inputs)} inputs; an image classifier takes exactly one (N, C, H, W)")
    t = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
    if len(dims) != 4 or t.elem_type != 1:  # 1 = FLOAT
        raise BadInput(f"{path}: input must be float32 N,C,H,W; got {len(dims)} dims of element type {t.elem_type}")
    return dims


def _accuracy(session, dataset: str, data_dir, input_shape, fixed_batch, class_names=()) -> tuple[float, int]:
    """Top-1 accuracy on the dataset's test split, images in [0, 1] resized to the model's H, W if needed.

    `folder`: the images under --data (a split of class folders, or a root with val/), labelled by `class_names`.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from flexslim.data.sources import load_dataset
    from flexslim.recipe.schema import DataConfig

    _, c, h, w = input_shape
    step = fixed_batch or 256
    if dataset == "folder":  # streamed: a validation folder need not fit in memory
        from flexslim.data.folders import eval_folder_batches

        batches = eval_folder_batches(data_dir, h, c, class_names, batch_size=step)
    else:
        ds = load_dataset(DataConfig(dataset=dataset, image_size=h), data_dir)
        if ds.input_shape[0] != c:
            raise BadInput(f"the model takes {c}-channel images but {dataset} has {ds.input_shape[0]}")
        batches = ds.test_batches(step)
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in batches:
        if x.shape[2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        n = len(x)
        if fixed_batch and n < fixed_batch:
            x = torch.cat([x, x.new_zeros(fixed_batch - n, *x.shape[1:])])
        logits = session.run(None, {name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0][:n]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        total += n
    return correct / max(1, total), total
