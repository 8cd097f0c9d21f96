"""The `flexslim search` job: latency model -> search -> bake -> trim -> retrain, in one run directory.

    runs/X/recipe.toml     resolved recipe
    runs/X/run.json        budget, latency settings, status, measured latency, trims
    runs/X/latency.json    the latency model (reused by --resume; --latency-table brings another)
    runs/X/search.jsonl    one line per search epoch;  search.png  the trajectory
    runs/X/arch.json       the baked widths (after trimming);  model.pt  the retrained network
Each step reads only what the previous one wrote, so an interrupted run continues with --resume.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from flexslim.arch import Arch, arch_json, load_arch
from flexslim.config import Recipe, load_recipe, recipe_to_toml
from flexslim.console import Reporter
from flexslim.data import load_dataset
from flexslim.errors import BadInput
from flexslim.latency import LatencyModel, profile
from flexslim.memory import SearchMemory
from flexslim.runs import atomic_write_json, atomic_write_text, mark_latest, new_run_dir, resolve_run_dir
from flexslim.trim import Fitted, fit_to_budget, round_to_budget


@dataclass(frozen=True)
class JobResult:
    run_dir: Path
    arch: Arch
    fitted: Fitted
    latency: LatencyModel
    history: list[dict]
    test_acc: float | None


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def latency_model_for(
    arch: Arch, recipe: Recipe, run_dir: Path, table: Path | None, reporter: Reporter
) -> LatencyModel:
    """--latency-table, else the run's own latency.json (resume), else measure one here."""
    cached = run_dir / "latency.json"
    if table is not None:
        model = LatencyModel.load(table)
        model.check_compatible(arch, recipe.latency, str(table))
        model.arch = arch
    elif cached.is_file():
        model = LatencyModel.load(cached)
        model.check_compatible(arch, recipe.latency, str(cached))
    else:
        reporter.log(
            f"measuring the latency model on {recipe.latency.provider} (batch {recipe.latency.batch}, "
            f"threads {recipe.latency.threads or 'default'}, p{recipe.latency.percentile:g})"
        )
        model = profile(arch, recipe.latency, recipe.model.min_width, recipe.model.round_to, reporter=reporter)
    model.save(cached)
    return model


def search_job(
    budget_ms: float,
    recipe_name: str = "quickstart",
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
    from flexslim.devices import pick_device
    from flexslim.plots import plot_search
    from flexslim.search import run_search
    from flexslim.train import evaluate, train_arch

    reporter = reporter or Reporter()
    if budget_ms is None or not budget_ms > 0:
        raise BadInput(f"--latency-ms must be a positive number of milliseconds, got {budget_ms}")
    dev = pick_device(device)
    if latency_table is not None:
        latency_table = Path(latency_table).resolve()  # before runs/latest moves
        if not latency_table.is_file():
            raise BadInput(f"latency table {latency_table} does not exist")
    if resume:
        run_dir = resolve_run_dir(run_dir)
        if not (run_dir / "recipe.toml").is_file():
            raise BadInput(f"{run_dir} has no recipe.toml: nothing to resume")
        recipe = load_recipe(str(run_dir / "recipe.toml"), overrides or [])
        prior = read_json(run_dir / "run.json")
        if prior.get("budget_ms") not in (None, budget_ms):
            raise BadInput(f"{run_dir} was searched for {prior['budget_ms']} ms, not {budget_ms} ms; start a new run")
    else:
        recipe = load_recipe(recipe_name, overrides or [])
        if run_dir is None:
            run_dir = new_run_dir(recipe.name)
        elif (run_dir / "run.json").exists():
            raise BadInput(f"{run_dir} already holds a run; pass --resume to continue it or pick a new --run-dir")
        run_dir.mkdir(parents=True, exist_ok=True)
    if recipe.search.method not in ("flexcharts", "dmask"):
        raise BadInput(f"unknown search.method '{recipe.search.method}'; valid: flexcharts, dmask")
    atomic_write_text(run_dir / "recipe.toml", recipe_to_toml(recipe))
    if mark:
        mark_latest(run_dir)
    info = {
        "budget_ms": budget_ms,
        "recipe": recipe.name,
        "method": recipe.search.method,
        "status": "started",
        "device": str(dev),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    prior = read_json(run_dir / "run.json") if resume else {}
    finished = resume and (run_dir / "arch.json").is_file() and prior.get("status") in ("searched", "done")
    if finished:  # keep what the finished search recorded (status, widths, measurement, trims)
        info = {**prior, **info, "status": prior["status"]}
    atomic_write_json(run_dir / "run.json", info)

    ds = load_dataset(recipe.data, data_dir)
    arch = Arch.from_model(recipe.model, ds.input_shape, ds.num_classes, ds.name, ds.mean, ds.std, ds.class_names)
    lat = latency_model_for(arch, recipe, run_dir, latency_table, reporter)
    err = lat.error_summary()
    reporter.log(
        f"latency model: floor {lat.floor_ms:.4f} ms (all stages at {recipe.model.min_width}), hold-out error "
        f"median {err.get('median_pct', float('nan')):.1f}% max {err.get('max_pct', float('nan')):.1f}% "
        f"over {err['holdout']} networks, provider {lat.provider}"
    )
    info["latency"] = {
        "provider": lat.provider,
        "batch": recipe.latency.batch,
        "threads": recipe.latency.threads,
        "percentile": recipe.latency.percentile,
        "floor_ms": lat.floor_ms,
        "error": err,
    }
    if budget_ms * (1.0 - recipe.search.trim_margin) < lat.floor_ms:
        atomic_write_json(run_dir / "run.json", {**info, "status": "impossible budget"})
        raise BadInput(
            f"--latency-ms {budget_ms:g} is below the floor of this family on {lat.provider}: the narrowest "
            f"network (every stage at min_width {recipe.model.min_width}) measures {lat.floor_ms:.4f} ms; "
            f"raise the budget or lower model.min_width"
        )

    # search (or reuse a finished one)
    if finished:
        baked = load_arch(run_dir / "arch.json")
        fitted = Fitted(
            baked.widths, prior["measured_ms"], prior.get("measured_p50_ms", 0.0), lat.provider, prior.get("trims", [])
        )
        history = [line for line in _read_jsonl(run_dir / "search.jsonl")]
        reporter.log(f"search already finished: widths {baked.widths}")
    else:
        if not resume:
            (run_dir / "search.jsonl").unlink(missing_ok=True)
        memory = SearchMemory(dev)
        memory.start()
        st = run_search(arch, recipe, ds.to(dev), budget_ms, lat, dev, run_dir, reporter, resume=resume)
        memory_info = memory.stop()
        history = st.history
        supernet_acc = evaluate(st.supernet, ds.test_x, ds.test_y, dev)[1]  # reported only, never searched on
        atomic_write_text(run_dir / "search.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        lat.save(run_dir / "latency.json")  # it may have been extended during the search
        plot_search(history, run_dir / "search.png", f"FlexCHarts search for {budget_ms:g} ms ({recipe.name})")
        searched = st.supernet.final_widths()
        if recipe.search.method == "flexcharts":  # mu -> widths on the round_to grid, within the target
            mus = {name: float(m.mu.detach()) for name, m in st.supernet.masks.items()}
            target = budget_ms * (1.0 - recipe.search.budget_margin)
            searched = round_to_budget(mus, lat, target, recipe.model.min_width, recipe.model.round_to)
        fitted = fit_to_budget(
            arch,
            searched,
            budget_ms,
            lat,
            recipe.latency,
            recipe.model.min_width,
            recipe.model.round_to,
            recipe.search.trim_margin,
            max_trims=200 if recipe.search.trim else 0,
            reporter=reporter,
        )
        baked = arch.with_widths(fitted.widths)
        atomic_write_text(run_dir / "arch.json", arch_json(baked))
        _, dense = st.supernet.bake(fitted.widths)  # the searched weights, for users who skip retraining
        from flexslim.train import save_model

        save_model(run_dir / "supernet_baked.pt", baked, dense, recipe, {"note": "weights sliced from the supernet"})
        info.update(
            status="searched",
            searched_widths=searched,
            widths=fitted.widths,
            measured_ms=fitted.measured_ms,
            measured_p50_ms=fitted.p50_ms,
            budget_met=fitted.measured_ms <= budget_ms,
            trims=fitted.trims,
            memory=memory_info,
            supernet_test_acc=supernet_acc,
            search_seconds=sum(h["seconds"] for h in history),
        )
        atomic_write_json(run_dir / "run.json", info)
        (run_dir / "search_state.pt").unlink(missing_ok=True)
        reporter.log(
            f"searched widths {searched} -> baked {fitted.widths}: measured p{recipe.latency.percentile:g} "
            f"{fitted.measured_ms:.4f} ms vs budget {budget_ms:g} ms"
            + (f" after {len(fitted.trims)} trim(s)" if fitted.trims else "")
        )

    test_acc = None
    if retrain and finished and prior.get("status") == "done" and (run_dir / "model.pt").is_file():
        test_acc = prior.get("test_acc")
        reporter.log(f"retraining already finished: {run_dir / 'model.pt'}")
    elif retrain:
        history_train = train_arch(baked, recipe, run_dir, ds, dev, reporter=reporter, resume=resume)
        test_acc = history_train[-1].test_acc
        info = read_json(run_dir / "run.json")
        info.update(status="done", test_acc=test_acc)
        atomic_write_json(run_dir / "run.json", info)
    return JobResult(run_dir, baked, fitted, lat, history, test_acc)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def profile_job(
    recipe_name: str, overrides: list[str], out: Path, data_dir: Path | None = None, reporter: Reporter | None = None
) -> LatencyModel:
    recipe = load_recipe(recipe_name, overrides)
    ds = load_dataset(recipe.data, data_dir)
    arch = Arch.from_model(recipe.model, ds.input_shape, ds.num_classes, ds.name, ds.mean, ds.std, ds.class_names)
    model = profile(arch, recipe.latency, recipe.model.min_width, recipe.model.round_to, reporter=reporter)
    model.save(out)
    return model
