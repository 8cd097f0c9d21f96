"""The comparison commands: `flexslim bench` (methods at equal measured latency) and `flexslim sweep` (N budgets
on one shared latency table, each delivered network measured by the gate). Registered on the shared `app`;
flexslim/cli/__init__.py imports this module after commands.py so --help keeps the order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flexslim.cli.app import (
    DataOpt,
    Device,
    DeviceOpt,
    NoCacheOpt,
    PrecisionOpt,
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
from flexslim.recipe.choices import BENCH_METHODS

EqualComputeOpt = Annotated[
    bool,
    typer.Option(
        "--equal-compute",
        help="Retrain uniform and random (prune: train its wide network and fine-tune) for as many epochs as match "
        "FlexCHarts' search + retraining compute (images x MACs) of the same seed; the searched methods then "
        "retrain with the recipe's train.init (by default fine-tuning their searched weights).",
    ),
]


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
    seeds: Annotated[
        str,
        typer.Option(
            help="Runs per method (search.seed = train.seed = base + i), e.g. 3, or 3,random=1,dmask-large=1 "
            "(per method); the table shows mean ± std."
        ),
    ] = "1",
    latency_table: Annotated[
        Optional[Path], typer.Option(help="Share this latency.json (flexslim profile) instead of measuring one.")
    ] = None,
    floor_x: Annotated[
        Optional[str],
        typer.Option(
            "--floor-x",
            help="Several budgets, as multiples of the family's measured floor (e.g. 1.5,2.5,4): one bench each on "
            "one shared table, then pareto.md/.png over them.",
        ),
    ] = None,
    data: DataOpt = None,
    device: DeviceOpt = Device.auto,
    set_: SetOpt = None,
    precision: PrecisionOpt = None,
    no_cache: NoCacheOpt = False,
    timer: TimerOpt = None,
    timer_token_file: TimerTokenOpt = None,
    equal_compute: EqualComputeOpt = False,
) -> None:
    """Compare FlexCHarts, DMaskingNAS, uniform scaling and random search at equal measured latency (paper Table 1,
    Fig. 4 with --floor-x)."""
    # the runs' own processes inherit the timer and the cache switch
    with command_exit_codes(), timer_for(timer, timer_token_file), switched_off(no_cache):
        from flexslim.bench.run import BenchRequest, parse_seeds
        from flexslim.recipe.checks import check_output_dir

        check_output_dir(out_dir, "--out")  # before anything is measured
        if throughput:
            return _print_throughput(recipe, set_, data, device)
        names = tuple(methods.split(",")) if methods else None
        request = BenchRequest(
            recipe, names, out_dir, budget_ms=latency_ms, retrain=retrain,
            overrides=tuple(with_precision(set_, precision)),
            data_dir=data, device=device.value, seeds=parse_seeds(seeds), latency_table=latency_table,
            equal_compute=equal_compute,
        )  # fmt: skip
        rows = _bench_rows(request, floor_x)
        if any("error" in r for r in rows):
            raise typer.Exit(1)


def _bench_rows(request, floor_x: str | None) -> list[dict]:
    """One bench (bench.md), or one per budget of `--floor-x` (pareto.md); the table printed, the rows returned."""
    from flexslim.bench.run import run_bench
    from flexslim.errors import BadInput

    log = lambda line: err.print(line, highlight=False)  # noqa: E731
    if floor_x is None:
        rows = run_bench(request, log=log)
        out.print((request.out / "bench.md").read_text())
        return rows
    from flexslim.bench.pareto import run_budgets

    if request.budget_ms is not None:
        raise BadInput("--latency-ms and --floor-x are exclusive: give one budget or multiples of the floor")
    rows = run_budgets(request, _floats(floor_x, "--floor-x"), log=log)
    out.print((request.out / "pareto.md").read_text())
    return rows


def _floats(text: str, flag: str) -> tuple[float, ...]:
    """A comma-separated list of finite numbers; BadInput naming the flag otherwise."""
    from flexslim.errors import BadInput
    from flexslim.recipe import checks

    try:
        return tuple(checks.finite(float(x), checks.flag(flag)) for x in text.split(",") if x.strip())
    except ValueError:
        raise BadInput(f"{flag} takes comma-separated numbers (e.g. 1.5,2.5,4), got {text!r}") from None


def _print_throughput(recipe: str, set_, data, device) -> None:
    """`bench --throughput`: images/s of the search and retrain steps and the mask overhead."""
    from flexslim.bench.throughput import measure_throughput
    from flexslim.data.sources import load_dataset
    from flexslim.recipe.schema import load_recipe
    from flexslim.system.devices import pick_device

    r = load_recipe(recipe, set_ or [])
    ds = load_dataset(r.data, data)
    t = measure_throughput(r, ds.input_shape, ds.num_classes, pick_device(device.value))
    out.print(
        f"device {t['device']}: search: {t['search_images_per_s']:.0f} images/s   retrain: "
        f"{t['retrain_images_per_s']:.0f} images/s   masked supernet step / dense step at the same "
        f"allocated widths {t['allocated']}: {t['mask_overhead_ratio']:.2f}x"
    )


@app.command()
def sweep(
    recipe: RecipeOpt = "quickstart",
    budgets: Annotated[
        int, typer.Option(help="Number of budgets, from just above the floor to the widest network.")
    ] = 5,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for sweep.md/csv/json/png and the runs.")] = Path(
        "sweep"
    ),
    retrain: Annotated[
        bool, typer.Option(help="Retrain every delivered network (accuracy of the retrained net).")
    ] = False,
    repeats: Annotated[int, typer.Option(help="Gate measurements of each delivered network (median).")] = 3,
    min_accuracy: Annotated[
        Optional[float],
        typer.Option(help="The fastest delivered network whose retrained accuracy reaches this (needs --retrain)."),
    ] = None,
    data: DataOpt = None,
    device: DeviceOpt = Device.auto,
    set_: SetOpt = None,
    precision: PrecisionOpt = None,
    no_cache: NoCacheOpt = False,
    timer: TimerOpt = None,
    timer_token_file: TimerTokenOpt = None,
) -> None:
    """Search N budgets on one shared latency table; measure what each delivered network really runs at (the gate:
    never from the latency cache). With --min-accuracy: the fastest network reaching it (exit 1, naming the best
    found, when none does)."""
    with command_exit_codes(), timer_for(timer, timer_token_file), switched_off(no_cache):
        from flexslim.jobs.sweep import SweepRequest, failed, sweep_job
        from flexslim.system.console import RichReporter

        _check_sweep_options(out_dir, min_accuracy, retrain)
        request = SweepRequest(
            recipe,
            budgets,
            out_dir,
            overrides=tuple(with_precision(set_, precision)),
            retrain=retrain,
            repeats=repeats,
            data_dir=data,
            device=device.value,
        )
        rows = sweep_job(request, reporter=RichReporter(err))
        out.print((out_dir / "sweep.md").read_text())
        if min_accuracy is not None:
            _print_fastest_reaching(rows, min_accuracy)
        if any(failed(r) for r in rows):
            raise typer.Exit(1)


def _check_sweep_options(out_dir: Path, min_accuracy: float | None, retrain: bool) -> None:
    """`sweep`'s checks before anything runs: the output folder, and --min-accuracy (a fraction, with --retrain)."""
    from flexslim.errors import BadInput
    from flexslim.recipe import checks

    checks.check_output_dir(out_dir, "--out")
    if min_accuracy is not None:
        checks.fraction(min_accuracy, checks.flag("--min-accuracy"))
        if not retrain:
            raise BadInput("--min-accuracy judges retrained networks: pass --retrain too")


def _print_fastest_reaching(rows: list[dict], min_accuracy: float) -> None:
    """`sweep --min-accuracy`: the fastest delivered network reaching it, or exit 1 naming the best found."""
    from flexslim.jobs.sweep import fastest_reaching

    fastest, best = fastest_reaching(rows, min_accuracy)
    if fastest is None:
        found = f"the best found: {best['widths']} at {best['accuracy']:.4f}" if best else "no network"
        out.print(f"FAIL: no delivered network reaches accuracy {min_accuracy:g}; {found}", markup=False)
        raise typer.Exit(1)
    out.print(
        f"fastest network reaching accuracy {min_accuracy:g}: {fastest['widths']} at "
        f"{fastest['delivered_ms']:.4f} ms (budget {fastest['budget_ms']:g} ms), accuracy "
        f"{fastest['accuracy']:.4f}, run {fastest['run_dir']}",
        markup=False,
    )
