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

from pathlib import Path

from flexslim.deploy.outputs import _accuracy, _check_declared_output
from flexslim.deploy.report import Check, Report
from flexslim.deploy.settings import DEFAULT_BATCH as DEFAULT_BATCH
from flexslim.deploy.settings import DEFAULTS as DEFAULTS
from flexslim.deploy.settings import (
    METADATA_SETTINGS,
    GateSettings,
    Measurement,
    _checked_arguments,
    _class_names,
    resolve_settings,
)
from flexslim.deploy.settings import available_cpus as available_cpus
from flexslim.errors import BadInput
from flexslim.latency import remote
from flexslim.latency.fingerprint import fingerprint_id, local_fingerprint
from flexslim.latency.runtime import EARLY_STOP, Timing, time_session
from flexslim.latency.sessions import PROVIDER_KEY, cuda_usable, make_session, placement
from flexslim.recipe import checks
from flexslim.recipe.choices import DATASETS, PRECISIONS, PROVIDERS
from flexslim.recipe.schema import LatencyConfig


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


NOTHING_TO_CHECK = "nothing to check: give --latency-ms and/or --min-accuracy"


def validate(
    model: str | Path,
    latency_ms: float | None = None,
    min_accuracy: float | None = None,
    *,
    dataset: str | None = None,
    data: str | Path | None = None,
    provider: str = "auto",
    measure: Measurement | None = None,
    precision: str | None = None,
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
        precision: what the graph must compute in (fp32 | int8 | fp16; None: whatever it does). The gate reads the
            precision from the graph itself; another than asked, or than its `flexslim.precision` metadata says, is
            BadInput.

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
    if precision is not None:
        checks.choice(precision, checks.flag("--precision"), PRECISIONS)
    meta, settings, names, graph, computes_in = _read_model(model, args, min_accuracy, data)
    _check_precision(model, computes_in, precision, meta)
    timer = remote.configured()
    session, timing, notes = _timed(model, provider, meta, settings, m, graph, timer)
    del graph  # the graph can be large: not held while the accuracy is computed
    notes += _placement_notes(timing, meta)
    accuracy, n_test = _measured_accuracy(session, settings, data, timing, names, model)
    twin_acc, twin_notes = _twin_accuracy(model, meta, computes_in, accuracy, settings, data, timing, names)
    verdict = _judge(timing, settings, accuracy, n_test, min_accuracy)
    return Report(str(model), provider, timing, settings.budget_ms, settings.dataset, accuracy, n_test, min_accuracy,
                  verdict, meta, from_metadata=dict(settings.from_metadata), notes=notes + twin_notes,
                  measured_on=remote.where(timer), device=_device_id(timer, timing), precision=computes_in,
                  fp32_accuracy=twin_acc)  # fmt: skip


PRECISION_KEY = "flexslim.precision"
TWIN_KEY = "flexslim.fp32_twin"


def _check_precision(model, computes_in: str, asked: str | None, meta: dict[str, str]) -> None:
    """BadInput when the graph computes in another precision than `asked`, or than its metadata says (metadata
    describes the graph; one that does not is refused, as every other metadata value that would mislead the
    gate)."""
    if asked is not None and asked != computes_in:
        raise BadInput(f"{model} computes in {computes_in}, not the {asked} that --precision {asked} asks for")
    said = meta.get(PRECISION_KEY)
    if said is not None:
        said = checks.choice(said.strip(), checks.metadata_key(PRECISION_KEY, "--precision"), PRECISIONS)
        if said != computes_in:
            raise BadInput(
                f"{model}: its metadata {PRECISION_KEY}={said} does not describe the graph, which computes in "
                f"{computes_in}; re-export it (flexslim export) or correct the metadata"
            )


def _twin_accuracy(model, meta, computes_in: str, accuracy, s: GateSettings, data, timing: Timing, names):
    """(the accuracy of the model's fp32 twin, notes): for a quantized or fp16 graph whose accuracy was computed and
    whose metadata names its twin (`flexslim.fp32_twin`, a file beside it), the twin on the same images - what
    quantization cost, reported next to the verdict (which is the given graph's alone)."""
    if accuracy is None or computes_in == "fp32" or TWIN_KEY not in meta:
        return None, ()
    from flexslim.deploy.outputs import _accuracy

    name = meta[TWIN_KEY].strip()
    if not name or Path(name).name != name or name in (".", ".."):
        raise BadInput(f"{model}: metadata {TWIN_KEY}={name[:80]!r} must name a file beside the model")
    twin = Path(model).resolve().parent / name
    if not twin.is_file():
        return None, (f"its fp32 twin {name} is not beside the model: what {computes_in} costs is not reported",)
    session = _open_session(twin, "cpu", s.threads)
    acc, _ = _accuracy(session, s.dataset, data, timing.input_shape, s.fixed_batch, names, twin)
    cost = 100 * (acc - accuracy)
    return acc, (f"{computes_in} accuracy {accuracy:.4f}, its fp32 twin {name} {acc:.4f} ({cost:+.2f} points)",)


def _timed(model, provider: str, meta: dict[str, str], settings, m, graph, timer):
    """(a session for the accuracy or None, the Timing, notes on the provider): timed here, or on the remote
    timer's device (`timer`), where this machine's session only computes the accuracy."""
    if timer is None:
        session, where, notes = _open_checked_session(model, provider, meta, settings.threads, graph)
        return session, time_session(session, m.plan(settings), budget_ms=settings.budget_ms, where=where), notes
    run_on, notes = resolve_provider(provider, meta, here=False)
    timing = remote.time_model(timer, Path(model).read_bytes(), run_on, m.plan(settings), settings.budget_ms)
    session = _open_session(model, "cpu", settings.threads) if settings.dataset is not None else None
    return session, timing, notes


def _device_id(timer, timing: Timing) -> str:
    """The fingerprint id of the device that measured `timing` (this machine, or the timer's): what a run's
    latency.json and run.json name, so a gate on another device can say so."""
    t = timing
    cfg = LatencyConfig(provider=t.provider, batch=t.batch, threads=t.threads, percentile=t.percentile)
    fp = remote.device(timer, cfg)["fingerprint"] if timer is not None else local_fingerprint(cfg, t.provider)
    return fingerprint_id(fp)


def _read_model(model: str | Path, args: dict, min_accuracy, data):
    """(the model's metadata, its GateSettings, its class names, its ONNX graph, the precision it computes in): the
    file read and checked, the
    settings resolved (`resolve_settings`), and what an accuracy needs checked before anything is measured."""
    accuracy_asked = min_accuracy is not None or args["dataset"] is not None or data is not None  # only when asked
    proto = load_onnx(model)
    meta = {p.key: p.value for p in proto.metadata_props}
    settings = resolve_settings(args, meta, _input_dims(proto, model), model, accuracy_asked=accuracy_asked)
    if settings.budget_ms is None and min_accuracy is None:
        raise BadInput(f"{NOTHING_TO_CHECK} (the model's metadata holds no {METADATA_SETTINGS['budget_ms'][0]})")
    from flexslim.models.precision import graph_precision

    names = _class_names(meta) if accuracy_asked else []
    if accuracy_asked:
        if settings.dataset is None:
            why = "--min-accuracy" if min_accuracy is not None else "--data"
            raise BadInput(f"{why} needs a dataset: pass --dataset ({', '.join(DATASETS)}); the model names none")
        if settings.dataset == "folder" and data is None:
            raise BadInput("the folder dataset needs --data DIR (a folder of class sub-folders, e.g. DIR/val)")
        _check_declared_output(proto, model, names)
    return meta, settings, names, proto.graph, graph_precision(proto)


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


def resolve_provider(asked: str, meta: dict[str, str], here: bool = True) -> tuple[str, tuple[str, ...]]:
    """(the provider to open the session with, notes). `auto` prefers the provider the model was searched for
    (`flexslim.latency_provider`) when it can run here (`here=False`: on a remote timer, which decides that
    itself); `cpu` and `cuda` are taken as asked. The metadata value is checked whether used or not (an unknown
    provider is BadInput)."""
    recorded = None
    if PROVIDER_KEY in meta:
        recorded = checks.choice(meta[PROVIDER_KEY].strip(), checks.metadata_key(PROVIDER_KEY, "--provider"), PROVIDERS)
    if asked != "auto" or recorded in (None, "auto"):
        return asked, ()
    if recorded == "cuda" and here and not cuda_usable():
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


def preload(accuracy: bool) -> None:
    """Import what `validate` needs before it measures (onnx, onnxruntime, numpy) and, with `accuracy`, what its
    accuracy read needs (torch and the dataset readers: ~1.2 s on the 2-core CPU): the export job runs this in the
    isolated helper while it converts (`start_isolated`), so the gate that follows starts at once. A process that
    has imported torch without running it times onnxruntime as one that has not (measured: four alternating fresh
    helpers each, 2026-12-08)."""
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    if accuracy:
        import torch  # noqa: F401

        from flexslim.data import sources  # noqa: F401


def validate_in_timer_environment(env: dict[str, str | None], *args, **kwargs) -> Report:
    """`validate` with the remote timer's environment `env` (`remote.timer_environment`) set first: the export's
    gate runs it in the isolated helper, which may have been started before the job named its timer. It lives here,
    not in `jobs.export`, because the helper imports the module of the function it runs: that one imports the
    exporter and torch (~1.6 s on the 2-core CPU), the gate imports neither."""
    remote.set_timer_environment(env)
    return validate(*args, **kwargs)
