"""The `flexslim` command line: parse, call one library function, render, exit code.

Exit codes: 0 done / gate passed, 1 gate failed, 2 bad input (one line on stderr, no traceback).
Heavy imports (torch, onnx, onnxruntime, matplotlib) happen inside the commands so `--help` is fast.
"""

from __future__ import annotations

import contextlib
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from flexslim.devices import DEVICES
from flexslim.distributed import is_main, printed_here
from flexslim.methods import BENCH_METHODS, SEARCH_METHODS
from flexslim.runtime import PROVIDERS

app = typer.Typer(
    name="flexslim",
    help="Find per-stage channel widths that meet a latency budget (FlexCHarts), retrain, export to ONNX, gate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _choices(name: str, names) -> type[Enum]:
    """A str Enum of the names of one table (typer shows and checks them as the option's choices)."""
    return Enum(name, {n.replace("-", "_"): n for n in names}, type=str)


Provider = _choices("Provider", PROVIDERS)
Device = _choices("Device", DEVICES)
Method = _choices("Method", SEARCH_METHODS)


RecipeOpt = Annotated[
    str, typer.Option("--recipe", "-r", help="Shipped recipe name (quickstart, ...) or a .toml path.")
]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a recipe value: section.key=value (repeatable).")
]
DataOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--data",
        help="Dataset folder (CIFAR-10: cifar-10-batches-py; folder: train/ and val/ of class sub-folders).",
    ),
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Training device.")]


@contextlib.contextmanager
def _exit_codes():
    """BadInput -> one line + exit 2; GateFailed -> one line + exit 1; a lost torchrun rank -> one line on every
    surviving rank + exit 3; Ctrl-C -> exit 130. Under torchrun bad input that every rank finds is printed by rank 0
    only."""
    from flexslim.errors import BadInput, GateFailed, RanksLost

    try:
        yield
    except BadInput as e:
        if printed_here(e):
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except RanksLost as e:
        from rich.markup import escape

        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(3) from None
    except GateFailed as e:
        err.print(f"[red]FAIL:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted; finished epochs are kept (rerun with --resume)")
        raise typer.Exit(130) from None


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
    set_: SetOpt = None,
    retrain: Annotated[bool, typer.Option(help="Retrain the baked network from scratch after the search.")] = True,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted run (runs/latest or --run-dir).")
    ] = False,
) -> None:
    """The main job: latency model -> FlexCHarts search -> bake -> trim to budget -> retrain.

    Data-parallel on N processes or GPUs: `torchrun --nproc-per-node N -m flexslim search ...`."""
    from flexslim.distributed import session

    with _exit_codes(), session(device.value):
        from flexslim.console import Reporter, RichReporter
        from flexslim.pipeline import search_job

        overrides = list(set_ or [])
        if method:
            overrides.append(f"search.method={method.value}")
        if provider:
            overrides.append(f"latency.provider={provider.value}")
        if latency_batch is not None:
            overrides.append(f"latency.batch={latency_batch}")
        res = search_job(
            latency_ms,
            recipe=recipe,
            overrides=overrides,
            data_dir=data,
            run_dir=run_dir,
            device=device.value,
            latency_table=latency_table,
            retrain=retrain,
            resume=resume,
            reporter=RichReporter(err) if is_main() else Reporter(),
        )
        if not is_main():
            return
        f = res.fitted
        out.print(
            f"run {res.run_dir}: widths {f.widths}, measured p90 {f.measured_ms:.4f} ms/sample "
            f"(budget {latency_ms:g} ms, {f.provider})"
            + (f", test accuracy {res.test_acc:.4f}" if res.test_acc is not None else "")
        )
        out.print("next: flexslim export model.onnx" if retrain else f"next: flexslim train {res.run_dir}")


@app.command()
def profile(
    recipe: RecipeOpt = "quickstart",
    provider: Annotated[Optional[Provider], typer.Option(help="onnxruntime provider (default: the recipe's).")] = None,
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the latency table.")] = Path("latency.json"),
    data: DataOpt = None,
    set_: SetOpt = None,
) -> None:
    """Measure and fit the latency model of a recipe's family on this machine (reuse with --latency-table)."""
    with _exit_codes():
        from flexslim.console import RichReporter
        from flexslim.pipeline import profile_job

        overrides = list(set_ or []) + ([f"latency.provider={provider.value}"] if provider else [])
        model = profile_job(recipe, overrides, out_path, data_dir=data, reporter=RichReporter(err))
        e = model.error_summary()
        out.print(
            f"wrote {out_path}: {len(model.fit_points)} fit + {len(model.holdout_points)} hold-out networks on "
            f"{model.provider} in {model.measure_seconds:.1f}s; floor {model.floor_ms:.4f} ms; hold-out error "
            f"median {e.get('median_pct', 0):.1f}% max {e.get('max_pct', 0):.1f}%"
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
    from flexslim.distributed import session

    with _exit_codes(), session(device.value):
        from flexslim.console import Reporter, RichReporter
        from flexslim.devices import pick_device
        from flexslim.train import open_train_run, train_arch

        run = open_train_run(target, recipe, set_ or [], data)
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
        last = history[-1]
        out.print(f"trained {run.run_dir / 'model.pt'}: test accuracy {last.test_acc:.4f} after {last.epoch} epochs")


@app.command()
def export(
    output: Annotated[Path, typer.Argument(help="Where to write the ONNX model (.onnx).")],
    run_dir: Annotated[Optional[Path], typer.Option(help="Run directory (default: runs/latest).")] = None,
    validate: Annotated[bool, typer.Option(help="Gate the exported model against the run's budget.")] = True,
    provider: Annotated[Optional[Provider], typer.Option(help="Provider for the gate (default: the recipe's).")] = None,
) -> None:
    """Export the run's trained model to ONNX (checked, parity-tested), then gate it against the run's budget."""
    with _exit_codes():
        from flexslim.export_job import export_run

        result = export_run(output, run_dir, provider=provider.value if provider else None, gate=validate)
        out.print(
            f"wrote {result.export.path} ({result.export.size_bytes / 1e6:.2f} MB, opset {result.export.opset}); "
            f"parity max |onnx - torch| = {result.export.parity_max_abs:.2e}"
        )
        if result.report is None:
            out.print("no budget recorded for this run: gate skipped" if validate else "gate skipped (--no-validate)")
            return
        _render_report(result.report)
        if not result.report.passed:
            raise typer.Exit(1)


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
    min_seconds: Annotated[float, typer.Option(help="Minimum seconds of timed runs (steadier p90).")] = 1.0,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs.")] = 10,
    dataset: Annotated[
        Optional[str], typer.Option(help="Dataset for accuracy: quickstart | cifar10 | folder (default: metadata).")
    ] = None,
    data: DataOpt = None,
    report: Annotated[Optional[Path], typer.Option(help="Write the report as JSON here.")] = None,
    junit: Annotated[Optional[Path], typer.Option(help="Write the checks as JUnit XML here.")] = None,
) -> None:
    """Gate an ONNX classifier: latency (and accuracy) vs budget. Exit 0 pass, 1 fail, 2 bad input."""
    with _exit_codes():
        from flexslim.validate import validate as run_validate

        rep = run_validate(
            model,
            latency_ms=latency_ms,
            min_accuracy=min_accuracy,
            provider=provider.value,
            batch=batch,
            percentile=percentile,
            dataset=dataset,
            data=data,
            threads=threads,
            warmup=warmup,
            runs=runs,
            min_seconds=min_seconds,
        )
        if report:
            rep.write_json(report)
        if junit:
            rep.write_junit(junit)
        _render_report(rep)
        if not rep.passed:
            raise typer.Exit(1)


@app.command()
def bench(
    recipe: RecipeOpt = "bench-cpu",
    methods: Annotated[Optional[str], typer.Option(help=f"Comma-separated, from: {','.join(BENCH_METHODS)}.")] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for bench.md, bench.csv, bench.png and the runs.")
    ] = Path("bench"),
    latency_ms: Annotated[
        Optional[float], typer.Option(help="Budget (default: the recipe's bench.latency_ms).")
    ] = None,
    retrain: Annotated[Optional[bool], typer.Option(help="Retrain every result and report test accuracy.")] = None,
    throughput: Annotated[
        bool, typer.Option("--throughput", help="Only time the search and retrain steps (images/s).")
    ] = False,
    data: DataOpt = None,
    device: DeviceOpt = Device.auto,
    set_: SetOpt = None,
) -> None:
    """Compare FlexCHarts, DMaskingNAS (small/large range) and uniform scaling at one budget (paper Table 1)."""
    with _exit_codes():
        if throughput:
            from flexslim.config import load_recipe
            from flexslim.data import load_dataset
            from flexslim.devices import pick_device
            from flexslim.throughput import measure_throughput

            r = load_recipe(recipe, set_ or [])
            ds = load_dataset(r.data, data)
            t = measure_throughput(r, ds.input_shape, ds.num_classes, pick_device(device.value))
            out.print(
                f"device {t['device']}: search: {t['search_images_per_s']:.0f} images/s   retrain: "
                f"{t['retrain_images_per_s']:.0f} images/s   masked supernet step / dense step at the same "
                f"allocated widths {t['allocated']}: {t['mask_overhead_ratio']:.2f}x"
            )
            return
        from flexslim.bench import run_bench

        rows = run_bench(
            recipe,
            methods.split(",") if methods else None,
            out_dir,
            budget_ms=latency_ms,
            retrain=retrain,
            overrides=set_ or [],
            data_dir=data,
            device=device.value,
            log=lambda line: err.print(line, highlight=False),
        )
        out.print((out_dir / "bench.md").read_text())
        if any("error" in r for r in rows):
            raise typer.Exit(1)


def _render_report(rep) -> None:
    from rich.table import Table

    t = rep.timing
    table = Table(title=f"flexslim validate: {rep.model}", show_header=True)
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
    if rep.accuracy is not None:
        lim = "-" if rep.min_accuracy is None else f"{rep.min_accuracy:g}"
        table.add_row(
            f"accuracy ({rep.dataset}, {rep.num_test} images)", f"{rep.accuracy:.4f}", lim, _verdict(rep, "accuracy")
        )
    out.print(table)
    out.print(
        f"provider {t.provider} (asked: {rep.requested_provider}), batch {t.batch}, input {list(t.input_shape)}, "
        f"threads {t.threads or 'default'}, {t.runs} timed runs after {t.warmup} warm-up, {t.runtime}"
    )
    out.print(
        ("[green]PASS[/green]" if rep.passed else "[red]FAIL[/red]")
        + f" {rep.summary()[7:] if rep.checks else 'no budget or target given'}",
        highlight=False,
    )


def _verdict(rep, name: str) -> str:
    check = next((c for c in rep.checks if c.name == name), None)
    if check is None:
        return ""
    return "[green]pass[/green]" if check.passed else "[red]FAIL[/red]"


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
