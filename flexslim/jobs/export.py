"""The `flexslim export` job: a run's trained model -> checked ONNX file -> the same budget gate as `validate`.

Conversion, checking and parity live in `export.py`; this module only orchestrates them over a run
directory and runs the gate in the isolated timing process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from flexslim.deploy.export import (
    PARITY_TOL,
    DeployedResult,
    ExportResult,
    export_deployed,
    export_model,
    provenance,
    twin_path,
)
from flexslim.errors import BadInput
from flexslim.system.files import atomic_write_bytes, file_sha256
from flexslim.system.runs import RunRecord, recorded_settings, resolve_run_dir


@dataclass(frozen=True)
class RunExport:
    """The exported file, the run it came from and, when the gate ran, its validate.Report."""

    export: ExportResult
    report: object | None  # validate.Report when the run has a budget and the gate ran
    run_dir: Path | None = None  # the run exported (runs/latest resolved when no run_dir was given)
    deployed: DeployedResult | None = None  # int8 / fp16: the deployed graph (`export` is then its fp32 twin)


def export_run(
    output: str | Path,
    run_dir: str | Path | None = None,
    *,
    provider: str | None = None,
    gate: bool = True,
    precision: str | None = None,
) -> RunExport:
    """Export runs/latest (or `run_dir`) to ONNX, then gate it against the run's budget when it has one, measured
    with the run's recorded latency settings (provider, batch, threads, percentile, timeout: `_with_timeout`).

    Args:
        output: the .onnx file to write (atomically, only when the parity check passes).
        provider: onnxruntime provider for the gate (default: the one the run measured on).
        gate: run the gate; without a budget in the run's record there is nothing to gate.
        precision: deploy at this precision instead of the one the run was searched for (int8 on an fp32 run: the
            fastest format here, by measurement; the gate's report then says the search spent another precision's
            latency).
    """
    from flexslim.recipe.checks import check_output_path

    check_output_path(output, "OUT.onnx")  # before the export and the gate
    run = resolve_run_dir(run_dir)
    record = RunRecord.load(run)  # a corrupt run.json is BadInput naming it
    source = _Source.of(run, record)
    lat, budget, arch = source.lat, source.budget, source.arch
    # accuracy on the run's dataset, which a folder run can only read where --data names it (export has none)
    dataset = arch.dataset if arch.dataset != "folder" else None
    if gate and budget is not None:  # the gate's helper starts (and imports) while this process converts
        _start_gate_helper(dataset is not None)
    searched_at = recorded_precision(lat, record)
    if precision is not None and precision != searched_at:
        lat = _redeployed(lat or {}, precision, arch)
    result, deployed = source.exported(Path(output), lat)
    if not gate or budget is None:
        return RunExport(result, None, run, deployed)
    path = deployed.path if deployed else result.path
    report = _gated(path, budget, provider or (lat or {}).get("provider", "auto"), lat, dataset, searched_at, record)
    return RunExport(result, report, run, deployed)


RUN_ONNX = "model.onnx"  # a search's own fp32 release export, beside its model.pt (`write_run_onnx`)


@dataclass
class _Source:
    """What a run's export is made from: model.pt (its sha256; the network, loaded only when it is converted), the
    recipe, the recorded latency settings and budget, and the metadata every export of it carries."""

    run: Path
    record: RunRecord
    sha256: str
    arch: object  # models.arch.Arch
    recipe: object | None  # recipe.schema.Recipe; None for a run without recipe.toml
    lat: dict | None
    budget: float | None
    model: object | None = None  # the torch network, once loaded

    @classmethod
    def of(cls, run: Path, record: RunRecord) -> _Source:
        """The run's model.pt (BadInput when missing) with the arch its own export recorded when that export was made
        from this very file (no torch needed), else the arch model.pt holds."""
        from flexslim.recipe.schema import load_recipe

        if not (run / "model.pt").is_file():
            raise BadInput(f"{run / 'model.pt'} does not exist; train the run first (`flexslim train RUN_DIR`)")
        sha = file_sha256(run / "model.pt")
        recipe = load_recipe(str(run / "recipe.toml")) if (run / "recipe.toml").is_file() else None
        recipe_lat = recorded_settings(recipe.latency, recipe.latency.provider) if recipe else None
        lat = _with_timeout(record.get("latency") or recipe_lat, recipe, record)
        source = cls(run, record, sha, None, recipe, lat, record.get("budget_ms"))
        source.arch = _exported_arch(record, sha) or source.network()[0]
        return source

    def network(self):
        """(arch, the eval-mode torch network) of model.pt, loaded once."""
        from flexslim.train.checkpoint import load_model

        if self.model is None:
            arch, self.model, _ = load_model(self.run / "model.pt")
            self.arch = self.arch or arch
        return self.arch, self.model

    def exported(self, output: Path, lat: dict | None) -> tuple[ExportResult, DeployedResult | None]:
        """`export_as_deployed` at `lat`'s precision, its fp32 export the run's own copied where it can be
        (`_copied_run_onnx`), else converted from model.pt."""
        meta = self.metadata(lat)
        copied = _copied_run_onnx(self, fp32_path(output, lat), meta)
        model = None if copied else self.network()[1]
        return export_as_deployed(model, self.arch, output, meta, lat, self.recipe, self.run, copied)

    def metadata(self, lat: dict | None) -> dict[str, str]:
        """The provenance an export of this run carries (`deploy.export.provenance`, with model.pt's sha256)."""
        name = self.recipe.name if self.recipe else "unknown"
        return provenance(self.arch, name, self.budget, lat, self.sha256)


def _recorded(record: RunRecord) -> dict | None:
    """run.json's record of the run's own export (`write_run_onnx`) when it has the shape written there, else None."""
    done = record.get("onnx")
    return done if isinstance(done, dict) and isinstance(done.get("metadata"), dict) else None


def _exported_arch(record: RunRecord, sha: str):
    """The arch of the run's own export when it was made from the model.pt whose sha256 is `sha`; None otherwise (no
    export, another model.pt, a record that does not parse)."""
    import json

    from flexslim.models.arch import Arch

    done = _recorded(record)
    if done is None or done["metadata"].get("flexslim.model_sha256") != sha:
        return None
    try:
        return Arch.from_dict(json.loads(done["metadata"]["flexslim.arch"]), where=f"{record.path} onnx.metadata")
    except (BadInput, KeyError, TypeError, ValueError):
        return None


def write_run_onnx(run: Path, record: RunRecord) -> ExportResult:
    """The run's fp32 release export, converted now (dynamo exporter, full checker, parity with torch, provenance)
    into run/model.onnx, and recorded in run.json (`onnx`: its sha256, metadata, parity, opset).

    The search writes it while its torch and exporter are loaded; `flexslim export` then copies it (checked against
    model.pt's sha256, its own bytes' sha256 and the metadata it would write) instead of importing torch and calling
    the exporter again (README job, 2-core CPU: export 8.6-9.1 -> 4.3-4.8 s; the conversion costs the search
    2.5-3 s). GateFailed on a parity failure, as `export` would fail; nothing is recorded then."""
    source = _Source.of(run, record)
    arch, model = source.network()
    meta = source.metadata(source.lat)
    result = export_model(model, arch, run / RUN_ONNX, meta)
    record.update(onnx={
        "file": RUN_ONNX,
        "sha256": file_sha256(result.path),
        "metadata": meta,
        "parity_max_abs": result.parity_max_abs,
        "parity_batches": list(result.parity_batches),
        "opset": result.opset,
    })  # fmt: skip
    return result


def run_onnx_current(run: Path, record: RunRecord) -> bool:
    """The run's own export (`write_run_onnx`) is there, unchanged, and of the model.pt the run holds now."""
    done, path = _recorded(record), run / RUN_ONNX
    if done is None or not path.is_file() or not (run / "model.pt").is_file():
        return False
    sha = file_sha256(run / "model.pt")
    return done["metadata"].get("flexslim.model_sha256") == sha and file_sha256(path) == done.get("sha256")


def _copied_run_onnx(source: _Source, out: Path, meta: dict[str, str]) -> ExportResult | None:
    """`out` written with the bytes of the run's own export (RUN_ONNX) when run.json records it with exactly `meta`
    (model.pt's sha256 among them) and the file still has the recorded sha256; None when it cannot be used."""
    done, path = _recorded(source.record), source.run / RUN_ONNX
    if done is None or done["metadata"] != meta or not path.is_file():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != done.get("sha256"):
        return None
    try:
        parity, opset = float(done["parity_max_abs"]), int(done["opset"])
        batches = tuple(int(b) for b in done["parity_batches"])
    except (KeyError, TypeError, ValueError):
        return None
    if not 0.0 <= parity <= PARITY_TOL:  # a record edited by hand: convert and check again
        return None
    if Path(out).resolve() != path.resolve():
        atomic_write_bytes(out, data)
    return ExportResult(Path(out), parity, batches, opset, len(data), copied_from=path)


def _gated(path: Path, budget: float, provider: str, lat: dict | None, dataset, searched_at: str, record: RunRecord):
    """The gate on the exported graph with the run's own latency settings, explicitly (metadata only describes;
    without a dataset it is latency-only), with its notes: another device than the run's, or another precision than
    the one searched for; a reading at the searched precision is recorded as one of the device's re-timings."""
    from flexslim.deploy.gate import Measurement

    precision = (lat or {}).get("precision", "fp32")
    report = gate_in_fresh_process(path, budget, provider, Measurement.of_run(lat), dataset, precision)
    report = _with_device_note(report, record)
    if precision == searched_at:
        _record_recheck(report, record)
        return report
    from dataclasses import replace

    why = f"the run was searched for {searched_at} latency and is deployed at {precision}: the search did not spend"
    why += f" what {precision} changes (search again with --precision)"
    return replace(report, notes=(*report.notes, why))


def _redeployed(lat: dict, precision: str, arch) -> dict:
    """The run's latency settings deployed at `precision`: fp16 only where CUDA runs; int8 in the fastest format on
    this device (timed on the run's own network: `int8_format_for`, which refuses int8 when no format is faster)."""
    from flexslim.latency.profiling import check_precision_runs, int8_format_for
    from flexslim.recipe.schema import LatencyConfig
    from flexslim.system.console import Reporter

    keys = ("provider", "batch", "threads", "percentile")
    s = LatencyConfig(**{k: lat[k] for k in keys if k in lat}, precision=precision)
    check_precision_runs(s)
    if precision == "int8":
        s, _ = int8_format_for(arch, s, Reporter())
    calibration = lat.get("calibration", s.calibration)
    return {**lat, "precision": precision, "int8_format": s.int8_format, "calibration": calibration}


def export_as_deployed(
    model, arch, output: Path, meta: dict, lat: dict | None, recipe, run: Path, fp32: ExportResult | None = None
):
    """(the fp32 export, the deployed graph or None): at fp32 the export is `output`; at int8 or fp16 it is the fp32
    twin beside it (checked, parity-tested) and `output` the graph converted from it (`export_deployed`). `fp32`:
    that fp32 export already written (the run's own, copied), else `model` is converted here."""
    fp32 = fp32 or export_model(model, arch, fp32_path(output, lat), meta)
    precision = (lat or {}).get("precision", "fp32")
    if precision == "fp32":
        return fp32, None
    fmt = lat.get("int8_format", "")
    return fp32, export_deployed(fp32.path, output, precision, fmt, _calibration(recipe, lat, run), meta)


def fp32_path(output: Path, lat: dict | None) -> Path:
    """Where the fp32 export of a deployment at `lat`'s precision goes: `output` itself at fp32, else its twin."""
    return Path(output) if (lat or {}).get("precision", "fp32") == "fp32" else twin_path(output)


def recorded_precision(lat: dict | None, record: RunRecord) -> str:
    """The precision run.json records (fp32 for a run of before 2026-12), with its int8 format, checked: a value
    from a file is data from outside."""
    from flexslim.recipe import checks
    from flexslim.recipe.choices import INT8_FORMATS, PRECISIONS

    lat = lat or {}
    fix = "fix it there, or delete the key for fp32"
    precision = checks.choice(lat.get("precision", "fp32"), checks.Origin(f"{record.path} latency.precision", fix),
                              PRECISIONS)  # fmt: skip
    if precision == "int8":
        where = checks.Origin(f"{record.path} latency.int8_format", "search the run again")
        checks.choice(lat.get("int8_format"), where, INT8_FORMATS)
    return precision


def _calibration(recipe, lat: dict, run: Path):
    """The images an int8 graph is calibrated on: `latency.calibration` training images of D_t (the weights' half
    of the training split, never the test split), float32 in [0, 1]; a folder dataset needs its --data at search
    time, which export does not have: BadInput."""
    from flexslim.data.sources import load_dataset

    if recipe is None:
        raise BadInput(f"{run} has no recipe.toml: the int8 calibration images (its training data) are unknown")
    if recipe.data.dataset == "folder":
        raise BadInput("int8 export of a folder run needs its images: not supported yet, export at --precision fp32")
    n = int(lat.get("calibration", recipe.latency.calibration))
    d_t, _ = load_dataset(recipe.data, None).search_halves(recipe.data.split_seed)
    x, _ = next(iter(d_t.train_batches(min(n, d_t.num_train), shuffle=True, seed=0)))
    return x.cpu().numpy()


def _record_recheck(report, record: RunRecord) -> None:
    """The gate's reading against the run's baked figure, as one of the device's re-timings (`latency.rechecks`: the
    headroom's measured floor of later bakes), when the gate timed in full on the device that baked it."""
    from flexslim.latency import rechecks

    t = getattr(report, "timing", None)
    if t is not None:
        rechecks.record_gate(record, getattr(report, "device", None), t.at_percentile_ms, t.stopped)


def _with_device_note(report, record: RunRecord):
    """The report with one more note when the gate measured on another device than the run's latency was measured
    on, or when the run's own network was never measured on its device (a table from another device, no timer)."""
    from dataclasses import replace

    table = record.get("latency_device")
    notes = []
    if isinstance(table, dict) and table.get("id") and table["id"] != report.device:
        notes.append(
            f"this gate measured on device {report.device} ({report.measured_on}), the run's latency table on "
            f"{table['id']} ({table.get('device', '?')}, {table.get('measured_on', '?')}): the verdict is this "
            "device's, not the deployment device's; gate there (--timer URL) for its verdict"
        )
    if record.get("measured_on_device") is False:
        notes.append("the run's bake ranked by a latency table of another device: its network was not measured there")
    return replace(report, notes=tuple(report.notes) + tuple(notes)) if notes else report


def _with_timeout(lat: dict | None, recipe, record: RunRecord) -> dict | None:
    """The run's latency settings with its `timeout` (seconds one gate measurement may take) checked. A run.json
    from before the key was recorded takes the run's recipe.toml (`latency.timeout`), else the default."""
    if lat is None:
        return None
    if "timeout" not in lat:
        from flexslim.latency.runtime import DEFAULT_TIMEOUT

        return {**lat, "timeout": recipe.latency.timeout if recipe else DEFAULT_TIMEOUT}
    from flexslim.recipe import checks

    where = checks.Origin(f"{record.path} latency.timeout", "fix it there, or delete the key for the default")
    return {**lat, "timeout": checks.timeout(lat["timeout"], where)}


ACCURACY_SECONDS = 600.0  # the export gate's accuracy on the run's test split (a shipped set: <= 10,000 images)


def _start_gate_helper(accuracy: bool) -> None:
    """Start the isolated helper the gate will run in, with the gate's imports (`deploy.gate.preload`), without
    waiting: its start-up overlaps the conversion (on the 2-core CPU the export's gate began ~1-2 s sooner)."""
    from flexslim.deploy.gate import preload
    from flexslim.latency.runtime import start_isolated

    start_isolated(preload, accuracy)


def gate_in_fresh_process(
    path: Path, budget_ms: float, provider: str, measure=None, dataset: str | None = None, precision: str | None = None
):
    """Run `validate` in the isolated timing process (a fresh interpreter, as in CI): right after an export,
    this process still has the exporter's threads and heap churn, which showed up as p90 spikes of 2-3x on
    a 2-core machine.

    The measurement stops itself at `measure.timeout` (a failed `timeout` check, exit 1); the helper is killed
    (TimedOut, exit 1) when the whole call outlives that by HELPER_GRACE (+ ACCURACY_SECONDS when the gate also
    reads `dataset`), as `time_isolated` kills a timing of the latency model."""
    from flexslim.deploy.gate import Measurement, validate_in_timer_environment
    from flexslim.latency.remote import timer_environment
    from flexslim.latency.runtime import HELPER_GRACE, run_isolated

    measure = measure or Measurement()
    limit_s = measure.timeout + HELPER_GRACE + (ACCURACY_SECONDS if dataset else 0.0)
    # the helper process keeps the working directory it was started in: hand it an absolute path; and the
    # environment it was started with: hand it the remote timer this job measures on
    return run_isolated(
        validate_in_timer_environment,  # pickled by module path: the helper imports the gate, not this module
        timer_environment(),
        Path(path).resolve(),
        latency_ms=budget_ms,
        provider=provider,
        measure=measure,
        dataset=dataset,
        precision=precision,
        limit_s=limit_s,
    )
