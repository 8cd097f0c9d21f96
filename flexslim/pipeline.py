"""The `flexslim search` job as named stages over one run record: prepare the run -> latency model ->
search (or reuse a finished one) -> bake and fit to the budget -> retrain (or reuse).

    runs/X/recipe.toml     resolved recipe
    runs/X/run.json        budget, latency settings, status, measured latency, trims (through RunRecord only)
    runs/X/latency.json    the latency model (reused by --resume; --latency-table brings another)
    runs/X/search.jsonl    one line per search epoch;  search.png  the trajectory
    runs/X/arch.json       the baked widths (after trimming);  model.pt  the retrained network
Each stage reads only what the previous one wrote, so an interrupted run continues with --resume.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from flexslim import distributed
from flexslim.arch import Arch, arch_json, load_arch
from flexslim.budget import Budget
from flexslim.config import Recipe, load_recipe, recipe_to_toml
from flexslim.console import Reporter
from flexslim.data import Dataset, load_dataset
from flexslim.errors import BadInput
from flexslim.latency import LatencyModel, profile
from flexslim.memory import SearchMemory
from flexslim.methods import check_search_method
from flexslim.runs import (
    RunRecord,
    atomic_write_text,
    mark_latest,
    new_run_dir,
    read_jsonl,
    remove,
    resolve_run_dir,
)
from flexslim.trim import Fitted, fit_to_budget, round_to_budget


@dataclass(frozen=True)
class JobResult:
    """What `search_job` hands back: the run, the baked architecture and every figure callers report.

    `memory` and `supernet_acc` are None when a finished search was reused; `test_acc` is None without
    retraining.
    """

    run_dir: Path
    arch: Arch
    fitted: Fitted
    latency: LatencyModel
    history: list[dict]
    test_acc: float | None
    memory: dict | None = None
    supernet_acc: float | None = None

    @property
    def search_seconds(self) -> float:
        return sum(h["seconds"] for h in self.history)


@dataclass(frozen=True)
class Searched:
    """The outcome of the search stage (fresh or reused)."""

    arch: Arch
    fitted: Fitted
    history: list[dict]
    memory: dict | None = None
    supernet_acc: float | None = None


def search_job(
    budget_ms: float,
    *,
    recipe: str = "quickstart",
    overrides: list[str] | None = None,
    data_dir: Path | None = None,
    run_dir: Path | None = None,
    device: str = "auto",
    latency_table: Path | None = None,
    retrain: bool = True,
    resume: bool = False,
    reporter: Reporter | None = None,
    mark: bool = True,
) -> JobResult:
    """The main job: search per-stage widths for `budget_ms`, bake, fit to the budget, retrain.

    Args:
        budget_ms: per-sample latency budget (ms) at the recipe's percentile on its provider.
        recipe: shipped recipe name or .toml path (ignored with `resume`: the run's own recipe is used).
        overrides: `section.key=value` strings applied to the recipe.
        run_dir: the run directory (default `runs/<time>-<recipe>`; with `resume`, `runs/latest`).
        latency_table: a latency.json from `flexslim profile` to use instead of measuring here.
        retrain: retrain the baked network from scratch (model.pt).
        resume: continue the interrupted (or finished) run in `run_dir`.
        mark: point `runs/latest` at the run.

    Returns:
        JobResult. Raises BadInput for unusable input (exit 2), including a budget below the family's floor.

    Example::

        res = search_job(0.06, recipe="quickstart", retrain=False)
        res.arch.widths, res.fitted.measured_ms
    """
    from flexslim.devices import pick_device

    reporter = reporter or Reporter()
    dev = pick_device(device)
    # under torchrun: rank 0 prepares the run, measures and bakes; every rank searches and retrains its shards
    table = distributed.on_main(lambda: _checked_table(latency_table))
    distributed.check_recipe(lambda: _resolve_recipe(recipe, overrides or [], run_dir, resume)[1], train=retrain)
    record, rcp = distributed.on_main(
        lambda: _prepare_run(budget_ms, recipe, overrides or [], run_dir, resume, mark, str(dev))
    )
    budget = Budget.from_recipe(budget_ms, rcp.search)
    with distributed.main_first():  # a download happens once
        ds = load_dataset(rcp.data, data_dir)
    arch = Arch.for_data(rcp.model, ds)
    lat = distributed.on_main(lambda: _latency_stage(arch, rcp, record, table, budget, reporter))
    done = distributed.on_main(lambda: _finished_search(record)) if resume else None
    if done is not None:
        reporter.log(f"search already finished: widths {done.arch.widths}")
    searched = done or _search_stage(arch, rcp, ds, budget, lat, record, dev, reporter, resume)
    test_acc = _retrain_stage(searched.arch, rcp, ds, record, dev, reporter, resume) if retrain else None
    return JobResult(
        record.run_dir,
        searched.arch,
        searched.fitted,
        lat,
        searched.history,
        test_acc,
        searched.memory,
        searched.supernet_acc,
    )


def _checked_table(latency_table: Path | None) -> Path | None:
    if latency_table is None:
        return None
    path = Path(latency_table).resolve()  # before runs/latest moves
    if not path.is_file():
        raise BadInput(f"latency table {path} does not exist")
    return path


# -- stage 1: the run directory and its record ----------------------------------------------------------------
def _resolve_recipe(
    recipe_name: str, overrides: list[str], run_dir: Path | None, resume: bool
) -> tuple[Path | None, Recipe]:
    """The recipe the job runs (a resumed run's own recipe.toml) and, when resuming, its run directory."""
    if resume:
        run_dir = resolve_run_dir(run_dir)
        if not (run_dir / "recipe.toml").is_file():
            raise BadInput(f"{run_dir} has no recipe.toml: nothing to resume")
        return run_dir, load_recipe(str(run_dir / "recipe.toml"), overrides)
    return run_dir, load_recipe(recipe_name, overrides)


def _prepare_run(
    budget_ms: float, recipe_name: str, overrides: list[str], run_dir: Path | None, resume: bool, mark: bool, dev: str
) -> tuple[RunRecord, Recipe]:
    """Check the inputs, then create (or reopen) the run directory, write recipe.toml and start the record."""
    Budget(budget_ms)  # a bad budget is refused before anything is created
    run_dir, recipe = _resolve_recipe(recipe_name, overrides, run_dir, resume)
    check_search_method(recipe.search.method)
    if resume:
        record = RunRecord.load(run_dir)
        if record.get("budget_ms") not in (None, budget_ms):
            raise BadInput(f"{run_dir} was searched for {record['budget_ms']} ms, not {budget_ms} ms; start a new run")
    else:
        if run_dir is not None and (run_dir / "run.json").exists():
            raise BadInput(f"{run_dir} already holds a run; pass --resume to continue it or pick a new --run-dir")
        run_dir = new_run_dir(recipe.name) if run_dir is None else run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        record = RunRecord(run_dir)
    atomic_write_text(run_dir / "recipe.toml", recipe_to_toml(recipe))
    if mark:
        mark_latest(run_dir)
    started = {"status": "started", "device": dev, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if _search_finished(record):  # keep what the finished search recorded (status among it)
        started.pop("status")
    record.update(budget_ms=budget_ms, recipe=recipe.name, method=recipe.search.method, **started)
    return record, recipe


# -- stage 2: the latency model -------------------------------------------------------------------------------
def latency_model_for(
    arch: Arch, recipe: Recipe, run_dir: Path, table: Path | None, reporter: Reporter
) -> LatencyModel:
    """--latency-table, else the run's own latency.json (resume), else measure one here; saved in the run."""
    cached = run_dir / "latency.json"
    if table is not None:
        model = LatencyModel.load(table)
        model.check_compatible(arch, recipe.latency, str(table))
        model.arch = arch
    elif cached.is_file():
        model = LatencyModel.load(cached)
        model.check_compatible(arch, recipe.latency, str(cached))
    else:
        s = recipe.latency
        reporter.log(
            f"measuring the latency model on {s.provider} (batch {s.batch}, "
            f"threads {s.threads or 'default'}, p{s.percentile:g})"
        )
        model = profile(arch, s, recipe.model.min_width, recipe.model.round_to, reporter=reporter)
    model.save(cached)
    return model


def _latency_stage(
    arch: Arch, recipe: Recipe, record: RunRecord, table: Path | None, budget: Budget, reporter: Reporter
) -> LatencyModel:
    """The latency model, recorded in run.json; a budget the narrowest network cannot meet is refused."""
    lat = latency_model_for(arch, recipe, record.run_dir, table, reporter)
    err = lat.error_summary()
    reporter.log(
        f"latency model: floor {lat.floor_ms:.4f} ms (all stages at {recipe.model.min_width}), hold-out error "
        f"median {err.get('median_pct', float('nan')):.1f}% max {err.get('max_pct', float('nan')):.1f}% "
        f"over {err['holdout']} networks, provider {lat.provider}"
    )
    s = recipe.latency
    settings = {"provider": lat.provider, "batch": s.batch, "threads": s.threads, "percentile": s.percentile}
    if not _search_finished(record):  # a finished search keeps what it recorded
        record.update(latency={**settings, "floor_ms": lat.floor_ms, "error": err})
    if budget.limit_ms < lat.floor_ms:
        record.update(status="impossible budget")
        raise BadInput(
            f"--latency-ms {budget.ms:g} is below the floor of this family on {lat.provider}: the narrowest "
            f"network (every stage at min_width {recipe.model.min_width}) measures {lat.floor_ms:.4f} ms; "
            f"raise the budget or lower model.min_width"
        )
    return lat


# -- stage 3: search (or reuse a finished one) and bake -------------------------------------------------------
def _search_finished(record: RunRecord) -> bool:
    return (record.run_dir / "arch.json").is_file() and record.get("status") in ("searched", "done")


def _finished_search(record: RunRecord) -> Searched | None:
    """The finished search of a resumed run (arch.json written, status searched or done), else None."""
    if not _search_finished(record):
        return None
    baked = load_arch(record.run_dir / "arch.json")
    fitted = Fitted(
        baked.widths,
        record["measured_ms"],
        record.get("measured_p50_ms", 0.0),
        record["latency"]["provider"],
        record.get("trims", []),
    )
    return Searched(baked, fitted, read_jsonl(record.run_dir / "search.jsonl"))


def _search_stage(
    arch: Arch,
    recipe: Recipe,
    ds: Dataset,
    budget: Budget,
    lat: LatencyModel,
    record: RunRecord,
    dev,
    reporter,
    resume: bool,
) -> Searched:
    """Run the search, write search.jsonl and search.png, bake and fit the widths, record it all."""
    from flexslim.search import run_search
    from flexslim.train import evaluate

    run_dir = record.run_dir
    if not resume:
        remove(run_dir / "search.jsonl")
    memory = SearchMemory(dev)
    memory.start()
    st = run_search(
        arch,
        recipe,
        ds.to(dev),
        budget=budget,
        latency=lat,
        device=dev,
        run_dir=run_dir,
        reporter=reporter,
        resume=resume,
    )
    memory_info = memory.stop()
    supernet_acc = evaluate(st.supernet, ds.test_x, ds.test_y, dev)[1]  # reported only, never searched on
    _write_search_outputs(st.history, lat, run_dir, f"FlexCHarts search for {budget.ms:g} ms ({recipe.name})")
    searched, fitted = distributed.on_main(lambda: _bake(st.supernet, arch, recipe, budget, lat, reporter))
    baked = arch.with_widths(fitted.widths)
    atomic_write_text(run_dir / "arch.json", arch_json(baked))
    _save_searched_weights(st.supernet, baked, recipe, run_dir)
    record.update(
        status="searched",
        searched_widths=searched,
        widths=fitted.widths,
        measured_ms=fitted.measured_ms,
        measured_p50_ms=fitted.p50_ms,
        budget_met=fitted.measured_ms <= budget.ms,
        trims=fitted.trims,
        memory=memory_info,
        supernet_test_acc=supernet_acc,
        search_seconds=sum(h["seconds"] for h in st.history),
    )
    remove(run_dir / "search_state.pt")
    reporter.log(
        f"searched widths {searched} -> baked {fitted.widths}: measured p{recipe.latency.percentile:g} "
        f"{fitted.measured_ms:.4f} ms vs budget {budget.ms:g} ms"
        + (f" after {len(fitted.trims)} trim(s)" if fitted.trims else "")
    )
    return Searched(baked, fitted, st.history, memory_info, supernet_acc)


def _write_search_outputs(history: list[dict], lat: LatencyModel, run_dir: Path, title: str) -> None:
    """search.jsonl (whole, once more: resumed runs append), latency.json (it may have been extended), search.png."""
    from flexslim.plots import plot_search

    atomic_write_text(run_dir / "search.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    lat.save(run_dir / "latency.json")
    plot_search(history, run_dir / "search.png", title)


def _bake(supernet, arch: Arch, recipe: Recipe, budget: Budget, lat: LatencyModel, reporter) -> tuple[dict, Fitted]:
    """Searched widths (budget-aware rounding of mu for FlexCHarts, the masks' own choice otherwise), then the
    measured fit to the budget (trimming unless the recipe turns it off)."""
    searched = supernet.final_widths()
    if recipe.search.method == "flexcharts":  # mu -> widths on the round_to grid, within the target
        mus = {name: float(w) for name, w in supernet.mean_widths().items()}
        searched = round_to_budget(mus, lat, budget.target_ms, recipe.model.min_width, recipe.model.round_to)
    fitted = fit_to_budget(
        arch,
        searched,
        budget=budget,
        latency=lat,
        settings=recipe.latency,
        min_width=recipe.model.min_width,
        round_to=recipe.model.round_to,
        max_trims=200 if recipe.search.trim else 0,
        reporter=reporter,
    )
    return searched, fitted


def _save_searched_weights(supernet, baked: Arch, recipe: Recipe, run_dir: Path) -> None:
    """supernet_baked.pt: the searched weights sliced to the baked widths, for users who skip retraining."""
    from flexslim.train import save_model

    _, dense = supernet.bake(baked.widths)
    save_model(run_dir / "supernet_baked.pt", baked, dense, recipe, {"note": "weights sliced from the supernet"})


# -- stage 4: retrain (or reuse) ------------------------------------------------------------------------------
def _retrain_stage(
    baked: Arch, recipe: Recipe, ds: Dataset, record: RunRecord, dev, reporter: Reporter, resume: bool
) -> float:
    """Retrain the baked network from scratch into model.pt (a finished retraining is reused on resume)."""
    from flexslim.train import train_arch

    if resume and record.get("status") == "done" and distributed.on_main((record.run_dir / "model.pt").is_file):
        reporter.log(f"retraining already finished: {record.run_dir / 'model.pt'}")
        return record.get("test_acc")
    history = train_arch(baked, recipe, record.run_dir, ds, dev, reporter=reporter, resume=resume)
    record.update(status="done", test_acc=history[-1].test_acc)
    return history[-1].test_acc


# -- `flexslim profile` ---------------------------------------------------------------------------------------
def profile_job(
    recipe_name: str,
    overrides: list[str],
    out: Path,
    *,
    data_dir: Path | None = None,
    reporter: Reporter | None = None,
) -> LatencyModel:
    """Measure and fit a recipe's latency model on this machine and save it to `out` (for --latency-table)."""
    recipe = load_recipe(recipe_name, overrides)
    ds = load_dataset(recipe.data, data_dir)
    model = profile(
        Arch.for_data(recipe.model, ds),
        recipe.latency,
        recipe.model.min_width,
        recipe.model.round_to,
        reporter=reporter,
    )
    model.save(out)
    return model
