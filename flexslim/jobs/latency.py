"""The run's latency model: the run's own latency.json (resume), else `--latency-table`, else measured here, then
measured near the budget and saved before the search reads it (`latency_model_for`); the budget its timing spread
gives, recorded in run.json (`latency_stage`, with how many networks the latency cache served); `flexslim profile`
(`profile_job`).
"""

from __future__ import annotations

import time
from pathlib import Path

from flexslim.errors import BadInput
from flexslim.latency import cache as latency_cache
from flexslim.latency import rechecks
from flexslim.latency.budget import Budget
from flexslim.latency.fingerprint import measuring_device
from flexslim.latency.model import LatencyModel, with_grid
from flexslim.latency.profiling import Sampling, profile, refine
from flexslim.models.arch import Arch
from flexslim.recipe.schema import Recipe, load_recipe
from flexslim.system.console import Reporter
from flexslim.system.files import file_sha256
from flexslim.system.runs import RunRecord, recorded_settings


# -- the run's latency model -------------------------------------------------------------------------------
def latency_model_for(
    arch: Arch,
    recipe: Recipe,
    run_dir: Path,
    table: Path | None,
    reporter: Reporter,
    budgets: list[float],
    *,
    resume: bool = False,
) -> LatencyModel:
    """The run's own latency.json when resuming (what it measured and refined: never measured again, whatever
    `table` is), else --latency-table (copied into the run before anything is measured), else measured here; then
    measured where `budgets` need it (`latency.refine`), and saved in the run before the search reads it."""
    cached = run_dir / "latency.json"

    def save(model: LatencyModel) -> None:  # whenever it changed: a killed run resumes from what was measured
        model.save(cached)

    if resume and cached.is_file():
        model = LatencyModel.load(cached)
        model.check_compatible(arch, recipe.latency, str(cached))
    elif table is not None:
        model = LatencyModel.load(table)
        model.check_compatible(arch, recipe.latency, str(table))
        model.arch = arch
        save(model)  # the run's own from here on: a resumed run reads this copy, never the table again
    else:
        s = recipe.latency
        reporter.log(
            f"measuring the latency model on {s.provider} (batch {s.batch}, "
            f"threads {s.threads or 'default'}, p{s.percentile:g})"
        )
        sampling = Sampling(budgets=tuple(budgets))
        model = profile(
            arch,
            s,
            recipe.model.min_width,
            recipe.model.round_to,
            sampling=sampling,
            reporter=reporter,
            checkpoint=save,
        )
    grid = with_grid(recipe, model).model.round_to
    refine(model, budgets, grid=grid, reporter=reporter, checkpoint=save)
    save(model)
    return model


def table_source(table: Path) -> dict:
    """What run.json records of a --latency-table: its path and the sha256 of its bytes."""
    return {"path": str(table), "sha256": file_sha256(table)}


def _note_other_table(record: RunRecord, table: Path, reporter: Reporter) -> None:
    """One note line when a resumed run is given a --latency-table other than the one it started with (it is not
    read: the run continues on its own latency.json)."""
    started = record.get("latency_table")
    if isinstance(started, dict) and started.get("sha256") == table_source(table)["sha256"]:
        return
    was = f"it started with {started.get('path')}" if isinstance(started, dict) else "it measured its own"
    reporter.log(
        f"note: --latency-table {table} is not the table this run started with ({was}); the run continues on its "
        f"own {record.run_dir / 'latency.json'} (as refined), measuring nothing again"
    )


def describe(lat: LatencyModel) -> str:
    """One line on a latency model's quality: block, hold-out error (all and near the budgets), timing spread."""
    e = lat.error_summary()

    def pct(key: str) -> str:
        return f"{e[key]:.1f}%" if key in e else "n/a"

    near = (
        f", near the budgets median {pct('near_median_pct')} max {pct('near_max_pct')}" if "near_holdout" in e else ""
    )
    under = " (narrower widths charged as themselves: measured)" if lat.below_block == "width" else ""
    return (
        f"channel block {lat.block}{under}, hold-out error median {pct('median_pct')} max {pct('max_pct')} over "
        f"{e['holdout']} networks{near}, timing spread {e['noise_pct']:.1f}%, provider {lat.provider}"
    )


def latency_stage(
    arch: Arch,
    recipe: Recipe,
    record: RunRecord,
    table: Path | None,
    budget_ms: float,
    reporter: Reporter,
    *,
    resume: bool = False,
) -> tuple[LatencyModel, Budget]:
    """The latency model and the budget its timing spread gives, both recorded in run.json (with the source of a
    --latency-table: path and sha256); a budget the narrowest network cannot meet is refused. A resumed run
    continues on its own latency.json (see `latency_model_for`); a table other than the one it started with gets
    one note line."""
    t0 = time.perf_counter()
    here = measuring_device(recipe.latency)
    if resume:
        _check_same_device(record, here)
    own = resume and (record.run_dir / "latency.json").is_file()
    if own and table is not None:
        _note_other_table(record, table, reporter)
    elif table is not None and not record.search_finished():
        record.update(latency_table=table_source(table))  # before measuring: a killed run knows what it started on
    before = latency_cache.tally()
    lat = latency_model_for(arch, recipe, record.run_dir, table, reporter, [budget_ms], resume=resume)
    cached = latency_cache.tally() - before
    log_cache_use(cached, reporter)
    budget = Budget.for_noise(budget_ms, lat.noise(), recipe.latency.confidence, rechecks.floor(here["id"]).value)
    err = lat.error_summary()
    reporter.log(
        f"latency model: floor {lat.floor_ms:.4f} ms (all stages at {recipe.model.min_width}), {describe(lat)}"
    )
    settings = recorded_settings(with_grid(recipe, lat).latency, lat.provider)
    elsewhere = lat.measured_elsewhere(here)
    if elsewhere:
        reporter.log(other_device_line(lat.device, here))
    if not record.search_finished():  # a finished search keeps what it recorded
        record.update(
            latency={**settings, "floor_ms": lat.floor_ms, "error": err, "block": lat.block},
            latency_device=lat.device or here,  # who measured the table
            measuring_device=here,  # who measures this job's bake (and resumes must measure on)
            measured_on_device=not elsewhere,
            budget=budget.as_dict(),
            latency_seconds=time.perf_counter() - t0,
            # summed over a killed run and its resumes (a resumed run's own latency.json is read, not measured)
            latency_cache_hits=record.get("latency_cache_hits", 0) + cached.hits,
            latency_cache_misses=record.get("latency_cache_misses", 0) + cached.misses,
        )
    try:
        budget.check_floor(lat.floor_ms, lat.provider, recipe.model.min_width)
    except BadInput:
        record.update(status="impossible budget")
        raise
    return lat, budget


def other_device_line(table: dict, here: dict) -> str:
    """The one line a job prints when its latency table was measured on another device than the one it measures on."""
    return (
        f"note: the latency table was measured on device {table.get('id')} ({table.get('device', '?')}, "
        f"{table.get('measured_on', '?')}); this job measures on {here['id']} ({here['device']}, "
        f"{here['measured_on']}): the table is not extended, the bake ranks by the table alone, and the delivered "
        "network is NOT measured on its device; pass --timer URL of that device's timer to measure it"
    )


def _check_same_device(record: RunRecord, here: dict) -> None:
    """BadInput when a resumed run would measure on another device than it started on (two devices never mix in
    one run)."""
    started = record.get("measuring_device")
    if isinstance(started, dict) and started.get("id") and started.get("id") != here["id"]:
        was = started.get("measured_on", "?")
        hint = f"rerun with --timer {was}" if was != "local" else "rerun without --timer (or $FLEXSLIM_TIMER)"
        raise BadInput(
            f"--resume of {record.run_dir}: it measures on device {started['id']} ({started.get('device', '?')}, "
            f"{was}), this job would measure on {here['id']} ({here['device']}, {here['measured_on']}); {hint}"
        )


def log_cache_use(used: latency_cache.Tally, reporter: Reporter) -> None:
    """One line on what the latency cache served of the networks a stage needed (none when it needed none)."""
    total = used.hits + used.misses
    if not total:
        return
    where = latency_cache.latency_folder() if latency_cache.enabled() else "the latency cache (off: --no-cache)"
    reporter.log(f"latency cache: {used.hits} of {total} networks served from {where}, {used.misses} timed")


# -- `flexslim profile` ---------------------------------------------------------------------------------------
def profile_job(
    recipe_name: str,
    overrides: list[str],
    out: Path,
    *,
    budgets: list[float] | None = None,
    data_dir: Path | None = None,
    reporter: Reporter | None = None,
) -> LatencyModel:
    """Measure and fit a recipe's latency model on this machine and save it to `out` (for --latency-table).

    With `budgets`, the table is also measured near each of them (what `sweep` shares among its searches)."""
    from flexslim.data.sources import load_dataset  # imports torch: not at the top, which export's copy path reads

    recipe = load_recipe(recipe_name, overrides)
    ds = load_dataset(recipe.data, data_dir)
    arch = Arch.for_data(recipe.model, ds)
    s, m = recipe.latency, recipe.model
    before = latency_cache.tally()
    model = profile(
        arch, s, m.min_width, m.round_to, sampling=Sampling(budgets=tuple(budgets or ())), reporter=reporter
    )
    log_cache_use(latency_cache.tally() - before, reporter or Reporter())
    model.save(out)
    return model
