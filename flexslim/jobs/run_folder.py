"""A search run's folder: its inputs checked before anything is created (`check_run`), then the folder created or
reopened and locked, its recipe.toml written and its record started (`open_run`); a resumed run keeps its own
recipe (`resumed_recipe`, which names the keys that overrides would change). Stage 1 of `jobs.search`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from flexslim.errors import BadInput
from flexslim.latency.profiling import check_precision_runs
from flexslim.recipe import checks
from flexslim.recipe.schema import Recipe, load_recipe, recipe_to_toml
from flexslim.search.methods import check_search_method
from flexslim.system.files import atomic_write_text
from flexslim.system.locks import lock_run
from flexslim.system.runs import RunRecord, check_run_dir_path, mark_started, new_run_dir, resolve_run_dir

if TYPE_CHECKING:
    from flexslim.jobs.search import SearchRequest


def check_run(req: SearchRequest) -> tuple[Recipe, Path | None]:
    """Check the inputs that need no data (budget, recipe, method, run directory) without creating anything;
    returns the recipe and the run directory (None: a new one under runs/).

    A resumed run's recipe is its own recipe.toml, and `--set` values that would change it are refused."""
    budget_ms, overrides, run_dir = req.budget_ms, list(req.overrides), req.run_dir
    checks.budget_ms(budget_ms, checks.flag("--latency-ms"))  # the Budget itself is built by the latency stage
    if req.resume:
        run_dir = resolve_run_dir(run_dir, resume=True)
        recipe = resumed_recipe(run_dir, overrides)
        record = RunRecord.load(run_dir)  # a corrupt run.json is BadInput naming it
        if record.get("budget_ms") not in (None, budget_ms):
            raise BadInput(f"{run_dir} was searched for {record['budget_ms']} ms, not {budget_ms} ms; start a new run")
    else:
        run_dir = check_run_dir_path(run_dir)
        recipe = load_recipe(req.recipe, overrides)
        if run_dir is not None and (run_dir / "run.json").exists():
            raise BadInput(f"{run_dir} already holds a run; pass --resume to continue it or pick a new --run-dir")
    check_search_method(recipe.search.method)
    check_precision_runs(recipe.latency)  # fp16 without CUDA: refused before the run directory exists
    return recipe, run_dir


def open_run(recipe: Recipe, run_dir: Path | None, req: SearchRequest, dev: str) -> RunRecord:
    """Create (or reopen and lock) the run directory, write recipe.toml (a new run only: a resumed run keeps its
    own), point runs/.started at a new one (runs/latest moves when the job finishes) and start the record. Runs only
    after every input was checked."""
    if req.resume:
        lock_run(run_dir)  # before anything in it changes
        record = RunRecord.load(run_dir)
    else:
        run_dir = new_run_dir(recipe.name) if run_dir is None else run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run(run_dir)
        if (run_dir / "run.json").exists():  # another job created it between the check and the lock
            raise BadInput(f"{run_dir} already holds a run; pass --resume to continue it or pick a new --run-dir")
        record = RunRecord(run_dir)
        atomic_write_text(run_dir / "recipe.toml", recipe_to_toml(recipe))
    if req.mark and not req.resume:
        mark_started(run_dir)
    started = {"status": "started", "device": dev, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if record.search_finished():  # keep what the finished search recorded (status among it)
        started.pop("status")
    record.update(budget_ms=req.budget_ms, recipe=recipe.name, method=recipe.search.method, **started)
    return record


def resumed_recipe(run_dir: Path, overrides: list[str]) -> Recipe:
    """The run's own recipe.toml; `overrides` (--set, --method, --provider, --latency-batch) are accepted only
    when they leave it unchanged: a resumed run never mixes two recipes."""
    path = run_dir / "recipe.toml"
    if not path.is_file():
        raise BadInput(f"{run_dir} has no recipe.toml: nothing to resume")
    recipe = load_recipe(str(path))
    if overrides:
        changed = load_recipe(str(path), overrides)
        if changed != recipe:
            keys = changed_keys(recipe_to_toml(recipe), recipe_to_toml(changed))
            raise BadInput(
                f"--resume of {run_dir}: the overrides change its recipe ({', '.join(keys) or 'values'}) and a run "
                "cannot mix two recipes; drop them, or start a new run with them"
            )
    return recipe


def changed_keys(before: str, after: str) -> list[str]:
    """The `section.key` names whose values differ between two resolved recipe TOML texts."""
    import tomllib

    a, b = tomllib.loads(before), tomllib.loads(after)
    keys = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section), b.get(section)
        if isinstance(sa, dict) and isinstance(sb, dict):
            keys += [f"{section}.{k}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
        elif sa != sb:
            keys.append(section)
    return keys
