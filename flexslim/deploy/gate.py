"""The gate: per-sample latency and/or accuracy of ANY ONNX image classifier against a budget and/or a target
-> Report (JSON, JUnit XML). Also the library call behind `flexslim validate`:

    report = flexslim.validate("model.onnx", latency_ms=0.3, min_accuracy=0.94, dataset="cifar10")
    assert report.passed, report.summary()

The contract (README "What the gate promises"), kept here and nowhere else:
- a verdict comes only from checks that ran: with nothing to check (no budget from the arguments or the
  metadata, no accuracy target) the gate refuses (BadInput), and a Report without checks never passes;
- accuracy is computed only when asked for (a target, or an explicit dataset or data folder), and only from one
  finite (N, classes) output whose class count is the dataset's (or the `flexslim.class_names` metadata's);
- the budget, dataset, batch, thread count and percentile come from the arguments, else from the model's
  `flexslim.*` metadata, else from the defaults; metadata may describe, never loosen: a percentile under the
  default, a batch over the default (or the model's fixed batch), more threads than the CPUs the runtime's default
  uses are refused unless the argument (flag) asks for that value;
- the provider that ran is the provider asked for: `cuda` is refused (BadInput) when onnxruntime would run any compute
  node on the CPU; `auto` prefers the model's `flexslim.latency_provider` when it can run here, and says when not;
- a measurement has a time limit (`Measurement.timeout`): past it the gate fails (exit 1) with a `timeout` check and
  measures nothing more; when the warm-up passes are already over EARLY_STOP x the budget, the latency check fails
  without the timed passes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flexslim.deploy.report import Check, Report
from flexslim.errors import BadInput
from flexslim.latency.runtime import (
    DEFAULT_TIMEOUT,
    EARLY_STOP,
    GATE_SECONDS,
    PROVIDER_KEY,
    Timing,
    TimingPlan,
    cuda_usable,
    make_session,
    placement,
    time_session,
)
from flexslim.recipe import checks
from flexslim.recipe.choices import DATASETS, PROVIDERS

DEFAULT_BATCH = 32


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
NOTHING_TO_CHECK = "nothing to check: give --latency-ms and/or --min-accuracy"


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
    """

    batch: int | None = None
    percentile: float | None = None
    threads: int | None = None
    warmup: int = 10
    runs: int = 50
    min_seconds: float = GATE_SECONDS
    timeout: float = DEFAULT_TIMEOUT

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


def validate(
    model: str | Path,
    latency_ms: float | None = None,
    min_accuracy: float | None = None,
    *,
    dataset: str | None = None,
    data: str | Path | None = None,
    provider: str = "auto",
    measure: Measurement | None = None,
) -> Report:
    """Measure an ONNX classifier and judge it against a latency budget and/or an accuracy target.

    Settings not passed come from the model's `flexslim.*` metadata (checked like the arguments, never laxer than
    the defaults, and listed in `Report.from_metadata`), else from the defaults. Every setting is checked before
    anything is measured.

    Args:
        model: the ONNX file: one float32 (N, C, H, W) input of images in [0, 1].
        latency_ms: the budget: per-sample latency (ms) at the percentile (default: the metadata's budget).
        min_accuracy: the minimum top-1 accuracy (fraction) on the dataset's test split.
        dataset: the dataset for accuracy (default, when accuracy is asked for: the metadata's).
        data: the dataset's folder (CIFAR-10 files, or a folder of class sub-folders for `folder`).
        provider: onnxruntime execution provider (auto, cpu, cuda). `cuda` is strict: BadInput when onnxruntime would
            run the model, or any compute node of it, on the CPU. `auto` takes the model's `flexslim.latency_provider`
            when that provider can run here (else CUDA when usable, else the CPU; a note says when the model's could
            not run).
        measure: batch, percentile, threads and the number and length of the timed passes (default: Measurement()).

    Returns:
        The Report; `report.passed` is the verdict.

    Raises:
        BadInput: an invalid argument, file or metadata value, metadata that would loosen the gate, nothing to
            check, outputs that are not finite (N, classes) class scores, or `cuda` asked for and not what ran.

    Example:
        >>> report = validate("model.onnx", latency_ms=0.3, min_accuracy=0.94, dataset="cifar10")
    """
    m = measure or Measurement()
    args = _checked_arguments(latency_ms, min_accuracy, dataset, provider, m)
    meta, settings, names, graph = _read_model(model, args, min_accuracy, data)
    session, where, notes = _open_checked_session(model, provider, meta, settings.threads, graph)
    del graph
    timing = time_session(session, m.plan(settings), budget_ms=settings.budget_ms, where=where)
    notes += _placement_notes(timing, meta)
    accuracy, n_test = _measured_accuracy(session, settings, data, timing, names, model)
    return Report(
        str(model),
        provider,
        timing,
        settings.budget_ms,
        settings.dataset,
        accuracy,
        n_test,
        min_accuracy,
        _judge(timing, settings, accuracy, n_test, min_accuracy),
        meta,
        from_metadata=dict(settings.from_metadata),
        notes=notes,
    )


def _read_model(model: str | Path, args: dict, min_accuracy, data):
    """(the model's metadata, its GateSettings, its class names, its ONNX graph): the file read and checked, the
    settings resolved (`resolve_settings`), and what an accuracy needs checked before anything is measured."""
    accuracy_asked = min_accuracy is not None or args["dataset"] is not None or data is not None  # only when asked
    proto = load_onnx(model)
    meta = {p.key: p.value for p in proto.metadata_props}
    settings = resolve_settings(args, meta, _input_dims(proto, model), model, accuracy_asked=accuracy_asked)
    if settings.budget_ms is None and min_accuracy is None:
        raise BadInput(f"{NOTHING_TO_CHECK} (the model's metadata holds no {METADATA_SETTINGS['budget_ms'][0]})")
    names = _class_names(meta) if accuracy_asked else []
    if accuracy_asked:
        if settings.dataset is None:
            why = "--min-accuracy" if min_accuracy is not None else "--data"
            raise BadInput(f"{why} needs a dataset: pass --dataset ({', '.join(DATASETS)}); the model names none")
        if settings.dataset == "folder" and data is None:
            raise BadInput("the folder dataset needs --data DIR (a folder of class sub-folders, e.g. DIR/val)")
        _check_declared_output(proto, model, names)
    return meta, settings, names, proto.graph


def _open_checked_session(model: str | Path, provider: str, meta: dict[str, str], threads: int, graph):
    """(the session, its Placement, notes on the provider): opened on the provider `resolve_provider` picks, and
    checked where it runs (`cuda` is refused unless CUDA runs every compute node)."""
    run_on, notes = resolve_provider(provider, meta)
    session = _open_session(model, run_on, threads)
    return session, placement(session, graph), notes


def _measured_accuracy(session, s: GateSettings, data, timing: Timing, class_names: list[str], model):
    """(top-1 accuracy, images) when a dataset was asked for and the timing did not run past its limit, else
    (None, 0)."""
    if s.dataset is None or timing.stopped == "timeout":  # past its time limit the gate does no more
        return None, 0
    return _accuracy(session, s.dataset, data, timing.input_shape, s.fixed_batch, class_names, model)


def resolve_provider(asked: str, meta: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    """(the provider to open the session with, notes). `auto` prefers the provider the model was searched for
    (`flexslim.latency_provider`) when it can run here; `cpu` and `cuda` are taken as asked. The metadata value is
    checked whether used or not (an unknown provider is BadInput)."""
    recorded = None
    if PROVIDER_KEY in meta:
        recorded = checks.choice(meta[PROVIDER_KEY].strip(), checks.metadata_key(PROVIDER_KEY, "--provider"), PROVIDERS)
    if asked != "auto" or recorded in (None, "auto"):
        return asked, ()
    if recorded == "cuda" and not cuda_usable():
        return "cpu", (
            f"the model was searched for cuda ({PROVIDER_KEY}=cuda) but onnxruntime's CUDA provider cannot run here: "
            "measured on cpu; run the gate on the deployment machine with --provider cuda",
        )
    return ("cpu" if recorded == "cpu" else "auto"), ()


def _placement_notes(timing: Timing, meta: dict[str, str]) -> tuple[str, ...]:
    """Notes on what ran, for `auto` (a strict `cuda` never gets here with a CPU node)."""
    notes = []
    if timing.cpu_nodes:
        shown = ", ".join(timing.cpu_nodes[:5]) + (" ..." if len(timing.cpu_nodes) > 5 else "")
        notes.append(f"{len(timing.cpu_nodes)} compute node(s) ran on the CPU inside the CUDA session: {shown}")
    wanted = meta.get(PROVIDER_KEY, "").strip()
    if wanted == "cuda" and timing.provider != "cuda" and cuda_usable():
        notes.append(f"the model was searched for cuda ({PROVIDER_KEY}) but onnxruntime ran it on {timing.provider}")
    if timing.stopped == "over_budget":
        notes.append(f"timing stopped after {timing.warmup} warm-up passes: over {EARLY_STOP:g}x the budget")
    return tuple(notes)


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


def _open_session(model: str | Path, provider: str, threads: int):
    try:
        return make_session(model, provider, threads)
    except BadInput:
        raise
    except Exception as err:  # noqa: BLE001 - onnxruntime refuses graphs it cannot run
        raise BadInput(f"onnxruntime cannot load {model}: {str(err).splitlines()[0][:160]}") from None


def _judge(timing: Timing, s: GateSettings, accuracy: float | None, n_test: int, min_accuracy) -> tuple[Check, ...]:
    """The checks that ran: latency (when there is a budget) and accuracy (when there is a target); a timing past its
    limit is one failed `timeout` check instead, and a warm-up already over EARLY_STOP x the budget a failed `latency`
    check. The one place a verdict is made: never from no checks, never from an accuracy outside [0, 1] (a bug: exit
    3, not a pass)."""
    if timing.stopped == "timeout":  # nothing was measured in full: one failed check says so, and nothing else
        return (_timeout_check(timing),)
    judged = [
        c for c in (_latency_check(timing, s), _accuracy_check(s, accuracy, n_test, min_accuracy)) if c is not None
    ]
    if not judged:  # validate() refuses this before measuring; a verdict from no checks is never given
        raise BadInput(NOTHING_TO_CHECK)
    return tuple(judged)


def _timeout_check(timing: Timing) -> Check:
    """The failed `timeout` check of a timing that ran past its limit."""
    return Check(
        "timeout",
        False,
        timing.elapsed_s,
        float(timing.timeout_s or 0.0),
        "s",
        f"timed out after {timing.timeout_s:g} s ({timing.warmup} warm-up and {timing.runs} "
        f"timed passes done, at least {timing.fastest_ms or timing.p50_ms:.4g} ms/sample; {timing.provider}, "
        f"batch {timing.batch}); pass a longer --timeout to measure it",
    )


def _latency_check(timing: Timing, s: GateSettings) -> Check | None:
    """The `latency` check: failed from the warm-up alone when timing stopped over budget, else the percentile
    against the budget; None without a budget."""
    if timing.stopped == "over_budget":  # no timed passes: the warm-up already showed the verdict
        fastest = float(timing.fastest_ms or timing.p50_ms)
        return Check(
            "latency",
            False,
            fastest,
            float(s.budget_ms),
            "ms",
            f"fastest of {timing.warmup} warm-up passes {fastest:.4f} ms/sample > budget {s.budget_ms:g} ms "
            f"x {EARLY_STOP:g}: stopped after the warm-up, no timed passes ({timing.provider}, batch "
            f"{timing.batch})",
        )
    if s.budget_ms is None:
        return None
    ok = timing.at_percentile_ms <= s.budget_ms
    source = " from the model's metadata" if "budget_ms" in s.from_metadata else ""
    return Check(
        "latency",
        ok,
        timing.at_percentile_ms,
        s.budget_ms,
        "ms",
        f"p{s.percentile:g} {timing.at_percentile_ms:.4f} ms/sample {'<=' if ok else '>'} budget "
        f"{s.budget_ms:g} ms{source} ({timing.provider}, batch {timing.batch})",
    )


def _accuracy_check(s: GateSettings, accuracy: float | None, n_test: int, min_accuracy) -> Check | None:
    """The `accuracy` check (None without a target); an accuracy outside [0, 1] or on no images is a bug (exit 3)."""
    if min_accuracy is None:
        return None
    if accuracy is None or not 0.0 <= accuracy <= 1.0 or n_test < 1:
        raise RuntimeError(f"the gate computed an accuracy of {accuracy!r} on {n_test} images (a bug)")
    ok = accuracy >= min_accuracy
    return Check(
        "accuracy",
        ok,
        accuracy,
        min_accuracy,
        "fraction",
        f"{accuracy:.4f} {'>=' if ok else '<'} {min_accuracy:g} on {s.dataset} test ({n_test} images)",
    )


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


def _shape_text(dims) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def _check_declared_output(proto, path, class_names: list[str]) -> None:
    """Before any accuracy: the graph declares exactly one output, of shape (N, classes) where the graph says."""
    outputs = list(proto.graph.output)
    if len(outputs) != 1:
        raise BadInput(
            f"{path} has {len(outputs)} outputs ({', '.join(o.name for o in outputs)}); the gate computes accuracy "
            "only from exactly one output of class scores, shape (N, classes)"
        )
    t = outputs[0].type.tensor_type
    if not t.HasField("shape"):
        return  # checked on the scores themselves
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    _check_scores_shape(dims, path, len(class_names) or None, "declares an output of shape")


def _check_scores_shape(dims, path, classes: int | None, what: str) -> None:
    if len(dims) != 2 or (classes is not None and isinstance(dims[1], int) and dims[1] != classes):
        need = f"(N, {classes})" if classes is not None else "(N, classes)"
        raise BadInput(
            f"{path} {what} {_shape_text(dims)}; accuracy needs class scores of shape {need} "
            "(flatten the head, e.g. torch.flatten(x, 1), and give one score per class)"
        )


def _scores(outputs: list, rows: int, classes: int | None, path):
    """The model's class scores for one batch: exactly one finite array of shape (rows, classes), else BadInput."""
    import numpy as np

    if len(outputs) != 1:
        raise BadInput(f"{path} gives {len(outputs)} outputs; accuracy needs exactly one, class scores (N, classes)")
    scores = np.asarray(outputs[0])
    _check_scores_shape(list(scores.shape), path, classes, "gives class scores of shape")
    if scores.shape[0] != rows:
        raise BadInput(f"{path} gives scores of shape {_shape_text(scores.shape)} for a batch of {rows} images")
    if not np.issubdtype(scores.dtype, np.floating) or not np.isfinite(scores).all():
        raise BadInput(
            f"{path} gives non-finite class scores (NaN or inf, shape {_shape_text(scores.shape)}, {scores.dtype}); "
            "a model that scores NaN has no accuracy: fix the model"
        )
    return scores


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


def _accuracy(session, dataset: str, data_dir, input_shape, fixed_batch, class_names=(), model="model"):
    """Top-1 accuracy on the dataset's test split, images in [0, 1] resized to the model's H, W if needed.

    The scores are checked on every batch (one finite (N, classes) output; classes = the dataset's class count and
    the model's `class_names`, which must agree). `folder`: the images under --data (a split of class folders, or a
    root with val/), labelled by `class_names`.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from flexslim.data.sources import load_dataset
    from flexslim.recipe.schema import DataConfig

    _, c, h, w = input_shape
    step = fixed_batch or 256
    classes = len(class_names) or None
    if dataset == "folder":  # streamed: a validation folder need not fit in memory
        from flexslim.data.folders import eval_folder_batches

        batches = eval_folder_batches(data_dir, h, c, class_names, batch_size=step)
    else:
        ds = load_dataset(DataConfig(dataset=dataset, image_size=h), data_dir)
        if ds.input_shape[0] != c:
            raise BadInput(f"the model takes {c}-channel images but {dataset} has {ds.input_shape[0]}")
        if classes is not None and classes != ds.num_classes:
            raise BadInput(
                f"model metadata flexslim.class_names names {classes} classes but {dataset} has {ds.num_classes}; "
                "pass the --dataset the model was trained on"
            )
        classes = ds.num_classes
        batches = ds.test_batches(step)
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in batches:
        if x.shape[2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        n = len(x)
        if fixed_batch and n < fixed_batch:
            x = torch.cat([x, x.new_zeros(fixed_batch - n, *x.shape[1:])])
        outputs = session.run(None, {name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        scores = _scores(outputs, len(x), classes, model)[:n]
        labels = y.numpy()
        if classes is None and labels.size and int(labels.max()) >= scores.shape[1]:
            raise BadInput(f"{model} gives {scores.shape[1]} class scores but the data has label {int(labels.max())}")
        correct += int((scores.argmax(1) == labels).sum())
        total += n
    if total == 0:
        raise BadInput(f"the {dataset} test split has no images; point --data at a split with images")
    return correct / total, total
