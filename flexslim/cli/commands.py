"""The `flexslim` command line: parse, call one library function, render, exit code.

Exit codes (flexslim.errors): 0 done / gate passed, 1 gate failed, 2 bad input, 3 internal error, 130 Ctrl-C,
143 SIGTERM; each failure is one line on stderr (a traceback only with `flexslim --debug ...`, else in a log
file the line names). Heavy imports (torch, onnx, onnxruntime, matplotlib) happen inside the commands so
`--help` is fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flexslim.cli.app import (
    DataOpt,
    Device,
    DeviceOpt,
    Method,
    NoCacheOpt,
    Precision,
    PrecisionOpt,
    Provider,
    RecipeOpt,
    SetOpt,
    TimerOpt,
    TimerTokenOpt,
    app,
    command_exit_codes,
    err,
    out,
    timer_for,
    with_precision,
)
from flexslim.latency.cache import switched_off
from flexslim.latency.runtime import DEFAULT_TIMEOUT, GATE_SECONDS
from flexslim.system.distributed import is_main


@app.command()
def search(
    latency_ms: Annotated[float, typer.Option(help="Budget: per-sample latency in ms on the deployment runtime.")],
    recipe: RecipeOpt = "quickstart",
    data: DataOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Run directory (default: runs/<time>-<recipe>).")] = None,
    method: Annotated[Optional[Method], typer.Option(help="Search method (default: the recipe's).")] = None,
    device: DeviceOpt = Device.auto,
    provider: Annotated[
        Optional[Provider], typer.Option(help="onnxruntime provider to search for (default: the recipe's).")
    ] = None,
    latency_batch: Annotated[
        Optional[int], typer.Option(help="Batch the budget is measured at (default: the recipe's).")
    ] = None,
    latency_table: Annotated[
        Optional[Path], typer.Option(help="Use a latency table from `flexslim profile` instead of measuring here.")
    ] = None,
    pretrained: Annotated[
        Optional[Path],
        typer.Option(help="A state_dict of the family's torchvision model at its own widths to start from."),
    ] = None,
    set_: SetOpt = None,
    precision: PrecisionOpt = None,
    retrain: Annotated[bool, typer.Option(help="Retrain the baked network from scratch after the search.")] = True,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted run (runs/latest or --run-dir).")
    ] = False,
    no_cache: NoCacheOpt = False,
    timer: TimerOpt = None,
    timer_token_file: TimerTokenOpt = None,
) -> None:
    """The main job: latency model -> FlexCHarts search -> measured bake (trim, fill) -> retrain.

    Data-parallel on N processes or GPUs: `torchrun --nproc-per-node N -m flexslim search ...`."""
    from flexslim.system.distributed import session

    with command_exit_codes(), timer_for(timer, timer_token_file), switched_off(no_cache), session(device.value):
        from flexslim.jobs.search import SearchRequest, search_job
        from flexslim.system.console import Reporter, RichReporter

        overrides = _search_overrides(with_precision(set_, precision), method, provider, latency_batch, pretrained)
        request = SearchRequest(
            latency_ms,
            recipe=recipe,
            overrides=tuple(overrides),
            data_dir=data,
            run_dir=run_dir,
            device=device.value,
            latency_table=latency_table,
            retrain=retrain,
            resume=resume,
            release_onnx=True,
        )
        res = search_job(request, reporter=RichReporter(err) if is_main() else Reporter())
        if is_main():
            _print_searched(res, latency_ms, retrain)


def _print_searched(res, latency_ms: float, retrain: bool) -> None:
    """search's result line and the next command."""
    f = res.fitted
    out.print(
        f"run {res.run_dir}: widths {f.widths}, measured p90 {f.measured_ms:.4f} ms/sample "
        f"(budget {latency_ms:g} ms, {f.provider})"
        + (f", test accuracy {res.test_acc:.4f}" if res.test_acc is not None else "")
    )
    out.print("next: flexslim export model.onnx" if retrain else f"next: flexslim train {res.run_dir}")


def _search_overrides(set_, method, provider, latency_batch, pretrained: Path | None) -> list[str]:
    """The `--set` values plus the search flags that are recipe values (method, provider, batch, pretrained)."""
    import json

    from flexslim.errors import BadInput

    overrides = list(set_ or [])
    if method:
        overrides.append(f"search.method={method.value}")
    if provider:
        overrides.append(f"latency.provider={provider.value}")
    if latency_batch is not None:
        overrides.append(f"latency.batch={latency_batch}")
    if pretrained is not None:
        if not pretrained.is_file():
            raise BadInput(f"--pretrained {pretrained}: no such file (a torch state_dict, e.g. torchvision's)")
        overrides.append(f"model.pretrained={json.dumps(str(pretrained.resolve()))}")  # a TOML string
    return overrides


@app.command()
def profile(
    recipe: RecipeOpt = "quickstart",
    provider: Annotated[Optional[Provider], typer.Option(help="onnxruntime provider (default: the recipe's).")] = None,
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the latency table.")] = Path("latency.json"),
    data: DataOpt = None,
    set_: SetOpt = None,
    precision: PrecisionOpt = None,
    no_cache: NoCacheOpt = False,
    timer: TimerOpt = None,
    timer_token_file: TimerTokenOpt = None,
) -> None:
    """Measure and fit the latency model of a recipe's family on this machine (reuse with --latency-table); networks
    already in the latency cache are read from it."""
    with command_exit_codes(), timer_for(timer, timer_token_file), switched_off(no_cache):
        from flexslim.jobs.latency import profile_job
        from flexslim.latency import cache
        from flexslim.recipe.checks import check_output_path
        from flexslim.system.console import RichReporter

        check_output_path(out_path, "--out")  # before the measurement
        overrides = with_precision(set_, precision) + ([f"latency.provider={provider.value}"] if provider else [])
        before = cache.tally()
        model = profile_job(recipe, overrides, out_path, data_dir=data, reporter=RichReporter(err))
        used = cache.tally() - before
        e = model.error_summary()
        out.print(
            f"wrote {out_path}: {len(model.fit_points)} fit + {len(model.holdout_points)} hold-out networks on "
            f"{model.provider} in {model.measure_seconds:.1f}s ({used.hits} from the latency cache); floor "
            f"{model.floor_ms:.4f} ms; hold-out error median {e.get('median_pct', 0):.1f}% "
            f"max {e.get('max_pct', 0):.1f}%"
        )


@app.command()
def train(
    target: Annotated[
        Optional[Path], typer.Argument(help="A run directory or an arch.json; omitted: the recipe's own widths.")
    ] = None,
    recipe: Annotated[
        Optional[str],
        typer.Option("--recipe", "-r", help="Recipe name or .toml path (default: the run's own, else quickstart)."),
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (default: the recipe's train.epochs).")] = None,
    data: DataOpt = None,
    device: DeviceOpt = Device.auto,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted training of this run.")] = False,
) -> None:
    """Retrain a network from scratch and write model.pt into its run directory.

    Data-parallel on N processes or GPUs: `torchrun --nproc-per-node N -m flexslim train ...`."""
    from flexslim.system.distributed import session

    with command_exit_codes(), session(device.value):
        from flexslim.jobs.train import open_train_run, train_arch
        from flexslim.recipe import checks
        from flexslim.system.console import Reporter, RichReporter
        from flexslim.system.devices import pick_device

        if epochs is not None:
            epochs = checks.count(epochs, checks.flag("--epochs"), cap=checks.MAX_EPOCHS)
        run = open_train_run(target, recipe, set_ or [], data, resume=resume, epochs=epochs)
        if is_main():
            err.print(f"run directory: {run.run_dir}  widths: {run.arch.widths}")

        history = train_arch(
            run.arch,
            run.recipe,
            run.run_dir,
            run.dataset,
            pick_device(device.value),
            epochs,
            RichReporter(err) if is_main() else Reporter(),
            resume=resume,
        )
        if not is_main():
            return
        from flexslim.system.runs import mark_latest

        mark_latest(run.run_dir)  # a finished training: a bare `export` now picks this run
        last = history[-1]
        out.print(f"trained {run.run_dir / 'model.pt'}: test accuracy {last.test_acc:.4f} after {last.epoch} epochs")


@app.command()
def export(
    output: Annotated[Path, typer.Argument(help="Where to write the ONNX model (.onnx).")],
    run_dir: Annotated[
        Optional[Path], typer.Option(help="Run directory (default: runs/latest, the newest finished run).")
    ] = None,
    validate: Annotated[bool, typer.Option(help="Gate the exported model against the run's budget.")] = True,
    provider: Annotated[Optional[Provider], typer.Option(help="Provider for the gate (default: the recipe's).")] = None,
    precision: Annotated[
        Optional[Precision],
        typer.Option(help="Deploy at this precision (default: the one the run was searched for, run.json)."),
    ] = None,
    timer: TimerOpt = None,
    timer_token_file: TimerTokenOpt = None,
) -> None:
    """Export the run's trained model to ONNX (checked, parity-tested), then gate it against the run's budget."""
    with command_exit_codes(), timer_for(timer, timer_token_file):
        from flexslim.jobs.export import export_run

        result = export_run(
            output,
            run_dir,
            provider=provider.value if provider else None,
            gate=validate,
            precision=precision.value if precision else None,
        )
        out.print(
            f"run {result.run_dir}: wrote {result.export.path} ({result.export.size_bytes / 1e6:.2f} MB, "
            f"opset {result.export.opset}); "
            f"parity max |onnx - torch| = {result.export.parity_max_abs:.2e}"
            + (f" (the search's conversion, copied from {c})" if (c := result.export.copied_from) else "")
        )
        if (d := result.deployed) is not None:
            how = (
                f"{d.precision} {d.int8_format}, calibrated on {d.calibration_images} D_t images"
                if d.int8_format
                else d.precision
            )
            out.print(
                f"deployed graph {d.path} ({how}; {d.size_bytes / 1e6:.2f} MB; max |{d.precision} - fp32| = "
                f"{d.max_abs_vs_fp32:.3g} on the calibration images); its fp32 twin is {d.twin}"
            )
        if result.report is None:
            out.print("no budget recorded for this run: gate skipped" if validate else "gate skipped (--no-validate)")
            return
        _render_report(result.report)
        if not result.report.passed:
            raise typer.Exit(1)


# validate's longer options
ToleranceOpt = Annotated[
    float, typer.Option(help="Stop early once the percentile's 95% interval is within +-this fraction (0: never).")
]
GatePrecisionOpt = Annotated[
    Optional[str],
    typer.Option(
        help="The precision the graph must run at: fp32 | int8 | fp16 (read from the graph; another is exit 2). "
        "Default: whatever the graph is, reported."
    ),
]
TimeoutOpt = Annotated[
    float,
    typer.Option(help="Seconds the measurement may take; past it the gate fails (exit 1, 'timed out after S s')."),
]
GateDatasetOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Dataset for accuracy: quickstart | cifar10 | folder | synthetic (default, when accuracy is "
        "asked for by --min-accuracy or --data: the model's metadata)."
    ),
]


@app.command()
def validate(
    model: Annotated[Path, typer.Argument(help="Any ONNX image classifier taking float32 NCHW images in [0, 1].")],
    latency_ms: Annotated[
        Optional[float], typer.Option(help="Budget: per-sample latency in ms at the percentile.")
    ] = None,
    min_accuracy: Annotated[
        Optional[float], typer.Option(help="Minimum top-1 accuracy (fraction) on the test split.")
    ] = None,
    provider: Annotated[
        Provider, typer.Option(help="onnxruntime execution provider (auto = CUDA when usable).")
    ] = Provider.auto,
    batch: Annotated[
        Optional[int], typer.Option(help="Batch of each timed pass (default: from metadata, else 32).")
    ] = None,
    percentile: Annotated[
        Optional[float], typer.Option(help="Percentile of the timed runs the budget applies to.")
    ] = None,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads (0 = runtime default).")] = None,
    runs: Annotated[int, typer.Option(help="Minimum number of timed runs.")] = 50,
    min_seconds: Annotated[
        float, typer.Option(help="Minimum seconds of timed runs, cut into windows; disturbed windows are left out.")
    ] = GATE_SECONDS,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs.")] = 10,
    tolerance: ToleranceOpt = 0.0,
    precision: GatePrecisionOpt = None,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
    dataset: GateDatasetOpt = None,
    data: DataOpt = None,
    # str, not Path: Path("out/") would drop the slash that says the user named a folder
    report: Annotated[Optional[str], typer.Option(help="Write the report as JSON here.")] = None,
    junit: Annotated[Optional[str], typer.Option(help="Write the checks as JUnit XML here.")] = None,
    timer: TimerOpt = None,
    timer_token_file: TimerTokenOpt = None,
) -> None:
    """Gate an ONNX classifier: latency vs budget and/or accuracy vs target. Exit 0 pass, 1 fail (also: timed out,
    or warm-up already far over the budget), 2 bad input (including nothing to check, metadata that would loosen the
    gate, outputs that are not (N, classes) scores, --provider cuda when onnxruntime would run it on the CPU)."""
    with command_exit_codes(), timer_for(timer, timer_token_file):
        from flexslim.deploy.gate import Measurement
        from flexslim.deploy.gate import validate as run_validate
        from flexslim.recipe.checks import check_output_path

        # before the measurement: a verdict must never be lost to an unwritable path
        report = check_output_path(report, "--report") if report is not None else None
        junit = check_output_path(junit, "--junit") if junit is not None else None
        precision, tolerance = _precision_flag(precision, tolerance)
        measure = Measurement(batch, percentile, threads, warmup, runs, min_seconds, timeout, tolerance)
        rep = run_validate(
            model,
            latency_ms,
            min_accuracy,
            dataset=dataset,
            data=data,
            provider=provider.value,
            measure=measure,
            precision=precision,
        )
        _write_and_render(rep, report, junit)


def _precision_flag(precision: str | None, tolerance: float) -> tuple[str | None, float]:
    """validate's --precision: a name (fp32 | int8 | fp16), or - as before 2026-12 - a number, the stopping
    tolerance that is now --tolerance (taken as it, with a note)."""
    from flexslim.recipe import checks
    from flexslim.recipe.choices import PRECISIONS

    if precision is None:
        return None, tolerance
    try:
        number = float(precision)
    except ValueError:
        return checks.choice(precision, checks.flag("--precision"), PRECISIONS), tolerance
    err.print(f"note: --precision {precision} is the stopping tolerance, now --tolerance (taken as it)", markup=False)
    return None, number


def _write_and_render(rep, report: str | None, junit: str | None) -> None:
    """The gate's report files (checked paths), its lines on the console, and exit 1 when it failed."""
    if report:
        rep.write_json(report)
    if junit:
        rep.write_junit(junit)
    _render_report(rep)
    if not rep.passed:
        raise typer.Exit(1)


def _render_report(rep) -> None:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    t = rep.timing
    table = Table(title=f"flexslim validate: {escape(rep.model)}", show_header=True)
    table.add_column("check")
    table.add_column("measured", justify="right")
    table.add_column("limit", justify="right")
    table.add_column("verdict")
    pct = f"p{t.percentile:g}"
    budget = rep.budget_ms
    table.add_row(
        f"latency {pct} (ms/sample)",
        f"{rep.latency_ms:.4f}",
        "-" if budget is None else f"{budget:g}",
        _verdict(rep, "latency"),
    )
    table.add_row("latency p50 / p90 (ms/sample)", f"{t.p50_ms:.4f} / {t.p90_ms:.4f}", "", "")
    if t.stopped == "timeout":
        table.add_row("time taken (s)", f"{t.elapsed_s:.1f}", f"{t.timeout_s:g}", _verdict(rep, "timeout"))
    if t.ci_low_ms is not None and t.ci_high_ms is not None:
        table.add_row(f"latency {pct}, 95% interval (ms/sample)", f"{t.ci_low_ms:.4f} .. {t.ci_high_ms:.4f}", "", "")
    if t.all_passes_ms is not None and t.quiet_windows < t.windows:
        table.add_row(f"latency {pct}, every pass (ms/sample)", f"{t.all_passes_ms:.4f}", "", "")
    if rep.accuracy is not None:
        lim = "-" if rep.min_accuracy is None else f"{rep.min_accuracy:g}"
        table.add_row(
            f"accuracy ({escape(str(rep.dataset))}, {rep.num_test} images)",
            f"{rep.accuracy:.4f}",
            lim,
            _verdict(rep, "accuracy"),
        )
    out.print(table)
    out.print(
        f"provider {t.provider} (asked: {rep.requested_provider}), {rep.precision}, batch {t.batch}, "
        f"input {list(t.input_shape)}, "
        f"threads {t.threads or 'default'}, {t.runs} timed runs after {t.warmup} warm-up "
        f"({t.quiet_windows} of {t.windows} windows undisturbed), {t.runtime}",
        highlight=False,
        markup=False,
    )
    if rep.measured_on != "local":
        out.print(f"measured on the timer {rep.measured_on} (device {rep.device})", highlight=False, markup=False)
    if t.known:
        out.print(
            f"timing stopped after {t.elapsed_s:.2f} s: the p{t.percentile:g} was known within "
            f"+-{100 * t.precision:g}% (95% interval from order statistics)",
            highlight=False,
            markup=False,
        )
    for note in rep.notes:
        out.print(f"note: {note}", highlight=False, markup=False)
    # plain text, not markup: the verdict names the metadata's values in [brackets]
    verdict = Text("PASS" if rep.passed else "FAIL", style="green" if rep.passed else "red")
    verdict.append(" " + rep.summary().split(" - ", 1)[1])
    out.print(verdict, highlight=False)


def _verdict(rep, name: str) -> str:
    check = next((c for c in rep.checks if c.name == name), None)
    if check is None:
        return ""
    return "[green]pass[/green]" if check.passed else "[red]FAIL[/red]"


def main() -> None:  # pragma: no cover
    """The `flexslim` console script: run the Typer app."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
