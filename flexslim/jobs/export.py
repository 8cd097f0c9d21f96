"""The `flexslim export` job: a run's trained model -> checked ONNX file -> the same budget gate as `validate`.

Conversion, checking and parity live in `export.py`; this module only orchestrates them over a run
directory and runs the gate in the isolated timing process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flexslim.deploy.export import ExportResult, export_model, provenance
from flexslim.system.runs import RunRecord, resolve_run_dir


@dataclass(frozen=True)
class RunExport:
    """The exported file, the run it came from and, when the gate ran, its validate.Report."""

    export: ExportResult
    report: object | None  # validate.Report when the run has a budget and the gate ran
    run_dir: Path | None = None  # the run exported (runs/latest resolved when no run_dir was given)


def export_run(
    output: str | Path, run_dir: str | Path | None = None, *, provider: str | None = None, gate: bool = True
) -> RunExport:
    """Export runs/latest (or `run_dir`) to ONNX, then gate it against the run's budget when it has one.

    Args:
        output: the .onnx file to write (atomically, only when the parity check passes).
        provider: onnxruntime provider for the gate (default: the one the run measured on).
        gate: run the gate; without a budget in the run's record there is nothing to gate.
    """
    from flexslim.recipe.checks import check_output_path
    from flexslim.recipe.schema import load_recipe
    from flexslim.train.checkpoint import load_model

    check_output_path(output, "OUT.onnx")  # before the export and the gate
    run = resolve_run_dir(run_dir)
    record = RunRecord.load(run)  # a corrupt run.json is BadInput naming it
    arch, model, _ = load_model(run / "model.pt")
    recipe = load_recipe(str(run / "recipe.toml")) if (run / "recipe.toml").is_file() else None
    lat = record.get("latency") or (_latency_settings(recipe) if recipe else None)
    budget = record.get("budget_ms")
    result = export_model(model, arch, output, provenance(arch, recipe.name if recipe else "unknown", budget, lat))
    if not gate or budget is None:
        return RunExport(result, None, run)
    from flexslim.deploy.gate import Measurement

    # the run's own latency settings, explicitly (metadata only describes); accuracy on the run's dataset, which a
    # folder run can only read where --data names it (export has none): then the gate is latency-only
    dataset = arch.dataset if arch.dataset != "folder" else None
    measure = Measurement.of_run(lat)
    report = gate_in_fresh_process(
        result.path, budget, provider or (lat or {}).get("provider", "auto"), measure, dataset
    )
    return RunExport(result, report, run)


def _latency_settings(recipe) -> dict:
    s = recipe.latency
    return {"provider": s.provider, "batch": s.batch, "threads": s.threads, "percentile": s.percentile}


def gate_in_fresh_process(path: Path, budget_ms: float, provider: str, measure=None, dataset: str | None = None):
    """Run `validate` in the isolated timing process (a fresh interpreter, as in CI): right after an export,
    this process still has the exporter's threads and heap churn, which showed up as p90 spikes of 2-3x on
    a 2-core machine."""
    from flexslim.deploy.gate import validate
    from flexslim.latency.runtime import run_isolated

    # the helper process keeps the working directory it was started in: hand it an absolute path
    return run_isolated(
        validate, Path(path).resolve(), latency_ms=budget_ms, provider=provider, measure=measure, dataset=dataset
    )
