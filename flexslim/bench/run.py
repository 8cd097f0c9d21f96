"""`flexslim bench`: every method on the same recipe, data, budget, latency table and seeds, each run in its own
process (so peak memory is its own), then a table shaped like the paper's Table 1 (mean +- std over the seeds),
a CSV, the per-run JSON and an accuracy-vs-latency PNG.

Methods: flexcharts | dmask-small | dmask-large (DMaskingNAS over the recipe's small / large fixed range) |
uniform (one width multiplier, bisection on measured latency) | random (random search inside the budget, within the
FlexCHarts run's search time). Every method's widths then go through the SAME measured bake (`search.bake`, the
search job's: trim, fill, exchange to the window [0.90, 1.00] x budget; capability-ranked by the supernet where
the method has one) before retraining, so methods are compared at equal measured latency. Every row carries the
same two latency figures: the shared latency table's prediction and the bake's measurement (the gate's statistic).
Search time is the search loop alone (latency measurement made during the search is reported apart). Memory:
`tensor_peak_mb`, the peak bytes of live tensors over a window of search steps at the widest allocation the
search used (torch.profiler memory events on the CPU, max_memory_allocated on CUDA; see memory.tensor_peak),
next to the process's peak resident set. `--seeds N` runs every method with search.seed = train.seed = base + i.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flexslim.bench.baselines import budget_for
from flexslim.bench.report import write_outputs
from flexslim.errors import BadInput
from flexslim.search.methods import bench_method
from flexslim.system.children import child_env


@dataclass(frozen=True)
class BenchRequest:
    """What `flexslim bench` is asked.

    Attributes:
        recipe: shipped recipe name or .toml path; overrides: `section.key=value` strings.
        methods: names from `recipe.choices.BENCH_METHODS` (default: the recipe's bench.methods).
        out: the bench folder (bench.md/csv/json/png, one run folder per method and seed).
        budget_ms: default the recipe's bench.latency_ms.
        retrain: retrain every result and report its test accuracy (default: the recipe's bench.retrain).
        seeds: runs per method; run i sets search.seed and train.seed to the recipe's search.seed + i
            (1: the recipe's seeds as they are). An int, or per method: `{"flexcharts": 3, "random": 1}` (methods
            not named get the largest count given; see `parse_seeds` for the flag's "3,random=1" form).
        latency_table: a latency.json of this recipe (`flexslim profile`) to share instead of measuring one.
        data_dir, device: as for `flexslim search`.
        equal_compute: the baselines (uniform, random; prune: its wide training and fine-tuning alike) train for as
            many epochs as make their search + retraining cost what the FlexCHarts run of the same seed cost (images
            x MACs, `bench.compute`), instead of the recipe's train.epochs; needs flexcharts among the methods and
            --retrain. The searched methods then retrain as flexslim does (the recipe's train.init, by default
            fine-tuning their searched weights), not from scratch: the comparison is of routes at equal compute.
    """

    recipe: str
    methods: tuple[str, ...] | None = None
    out: Path = Path("bench")
    budget_ms: float | None = None
    retrain: bool | None = None
    overrides: tuple[str, ...] = ()
    data_dir: Path | None = None
    device: str = "auto"
    seeds: int | dict[str, int] = 1
    latency_table: Path | None = None
    equal_compute: bool = False


def run_bench(request: BenchRequest, log=print) -> list[dict]:
    """Every method on one recipe, budget and latency table, `seeds` times, each run in its own process ->
    bench.md/csv/json/png. `log` is called with one line per event.

    Returns:
        One row per run (a failed run's row has an "error").

    Example::

        rows = run_bench(BenchRequest("bench-cpu", ("flexcharts", "dmask-large"), Path("b"), seeds=3))
        summarize(rows)["flexcharts"]["search_seconds"]   # (mean, std) over the three seeds
    """
    r = request
    recipe_name, out, data_dir, latency_table, device = r.recipe, r.out, r.data_dir, r.latency_table, r.device
    methods, budget_ms, seeds, retrain = r.methods, r.budget_ms, r.seeds, r.retrain
    from flexslim.recipe.schema import load_recipe

    overrides = list(r.overrides)
    recipe = load_recipe(recipe_name, overrides)
    methods = [bench_method(m).name for m in (methods or recipe.bench.methods)]
    budget = _checked_budget_and_seeds(recipe, budget_ms, seeds)
    if isinstance(seeds, dict) and set(seeds) - {"*"} - set(methods):
        raise BadInput(f"--seeds names {', '.join(sorted(set(seeds) - {'*'} - set(methods)))}, not among the methods")
    retrains = recipe.bench.retrain if retrain is None else retrain
    if r.equal_compute and ("flexcharts" not in methods or not retrains):
        raise BadInput("--equal-compute gives the baselines FlexCHarts' compute: it needs flexcharts among --methods "
                       "and --retrain")  # fmt: skip
    needs_retrain = [m for m in methods if m in ("ceiling", "prune")]
    if needs_retrain and not retrains:
        raise BadInput(f"bench method {needs_retrain[0]} retrains the networks it finds: pass --retrain")
    if "prune" in methods:
        from flexslim.bench.prune import require_torch_pruning

        require_torch_pruning()  # before any table is measured or run started
    out.mkdir(parents=True, exist_ok=True)
    if latency_table is not None:
        table = _reuse_latency_table(Path(latency_table), out / "latency.json", log)
    else:
        table = _shared_latency_table(recipe_name, overrides, out / "latency.json", budget, data_dir, log)
    budget_for(budget, recipe, table).check_floor(table.floor_ms, table.provider, recipe.model.min_width)
    base = {
        "recipe": recipe_name,
        "overrides": overrides,
        "budget_ms": budget,
        "out": str(out),
        "latency_table": str(out / "latency.json"),
        "retrain": retrains,
        "device": device,
        "data": str(data_dir) if data_dir else None,
        "equal_compute": r.equal_compute,
    }
    rows: list[dict] = []
    for run in _runs(methods, seeds, recipe.search.seed):
        if run["method"] == "random":
            run["random_seconds"] = _random_seconds(rows, run["seed"], recipe)
        if r.equal_compute and run["method"] in EQUAL_COMPUTE:
            run["compute_gmacs"] = _flexcharts_compute(rows, run["seed"])
        rows.append(_run_method({**base, **run}, out, log))
    write_outputs(rows, out, budget, recipe.name)
    return rows


EQUAL_COMPUTE = ("uniform", "random", "prune")  # the baselines --equal-compute gives FlexCHarts' compute


def _checked_budget_and_seeds(recipe, budget_ms: float | None, seeds) -> float:
    budget = budget_ms if budget_ms is not None else recipe.bench.latency_ms
    if not budget or budget <= 0:
        raise BadInput(f"recipe {recipe.name} sets no bench.latency_ms; pass --latency-ms")
    counts = seeds.values() if isinstance(seeds, dict) else [seeds]
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise BadInput(f"--seeds must be a whole number >= 1 (or N,method=K,...), got {seeds}")
    return budget


def parse_seeds(text: str) -> int | dict[str, int]:
    """`--seeds`: "3" (every method 3 runs), or "3,random=1,dmask-large=1" (3 runs, random search and DMask-large
    one each), or "flexcharts=3,uniform=3" (the methods not named: the largest count given)."""
    from flexslim.recipe.choices import BENCH_METHODS

    default, per, parts = None, {}, [p.strip() for p in str(text).split(",") if p.strip()]
    for part in parts:
        name, eq, count = part.rpartition("=") if "=" in part else ("", "", part)
        if not count.isdigit() or int(count) < 1:
            raise BadInput(f"--seeds must be a whole number >= 1 (or N,method=K,...), got {text!r}")
        if not eq:
            default = int(count)
        elif name.strip() not in BENCH_METHODS:
            raise BadInput(f"--seeds: unknown method {name.strip()!r} (known: {', '.join(BENCH_METHODS)})")
        else:
            per[name.strip()] = int(count)
    if not parts or (default is None and not per):
        raise BadInput(f"--seeds must be a whole number >= 1 (or N,method=K,...), got {text!r}")
    if not per:
        return default
    return {**({"*": default} if default is not None else {}), **per}


def _random_seconds(rows: list[dict], seed, recipe) -> float:
    """Random search's time allowance: the search time of the FlexCHarts run of the same seed (else of any), else
    `bench.random_seconds`."""
    searched = [r for r in rows if r.get("method") == "flexcharts" and "error" not in r]
    same = [r for r in searched if r.get("seed") == seed] or searched
    return float(same[-1]["search_seconds"]) if same else recipe.bench.random_seconds


def _flexcharts_compute(rows: list[dict], seed) -> float | None:
    """What the FlexCHarts run of the same seed (else of any) cost, search and retraining (1e9 MACs); None: none ran."""
    searched = [r for r in rows if r.get("method") == "flexcharts" and "error" not in r and r.get("total_gmacs")]
    same = [r for r in searched if r.get("seed") == seed] or searched
    return float(same[-1]["total_gmacs"]) if same else None


def seeds_of(seeds: int | dict[str, int], methods: list[str]) -> dict[str, int]:
    """Runs per method: an int for all, or a mapping (key "*": the methods not named; else the largest count)."""
    if not isinstance(seeds, dict):
        return {m: seeds for m in methods}
    rest = seeds.get("*", max(seeds.values()))
    return {m: seeds.get(m, rest) for m in methods}


def _runs(methods: list[str], seeds: int | dict[str, int], first_seed: int) -> list[dict]:
    """The runs of a bench: every method per seed ({"method", "seed", "run": the run folder's name}), seed by seed
    (a method with fewer runs stops early); FlexCHarts first, random search last (the baselines may get FlexCHarts'
    search time and compute).
    Seeds are labelled (search.seed = train.seed = first + i) as soon as any method runs more than once."""
    methods = sorted(methods, key=lambda m: (m != "flexcharts", m == "random"))
    counts = seeds_of(seeds, methods)
    many = max(counts.values(), default=1) > 1
    runs = []
    for i in range(max(counts.values(), default=0)):
        seed = first_seed + i if many else None
        runs += [
            {"method": m, "seed": seed, "run": m if seed is None else f"{m}-seed{seed}"}
            for m in methods
            if i < counts[m]
        ]
    return runs


def _shared_latency_table(recipe_name: str, overrides: list[str], table: Path, budget: float, data_dir, log):
    """Measure the one latency table every method uses (saved at `table`) -> the LatencyModel."""
    from flexslim.jobs.latency import profile_job
    from flexslim.latency import cache

    log(f"bench {recipe_name}: budget {budget:g} ms; measuring the shared latency table")
    t0 = time.perf_counter()
    before = cache.tally()
    model = profile_job(recipe_name, overrides, table, data_dir=data_dir)
    used = cache.tally() - before
    log(
        f"latency table: {time.perf_counter() - t0:.0f}s ({used.hits} of {used.hits + used.misses} networks from the "
        f"latency cache), hold-out error median {model.error_summary().get('median_pct', 0):.1f}%, floor "
        f"{model.floor_ms:.4f} ms"
    )
    return model


def _reuse_latency_table(src: Path, table: Path, log):
    """Share a measured latency table (its compatibility is checked by every run that loads it) -> the model."""
    from flexslim.latency.fingerprint import measuring_device
    from flexslim.latency.model import LatencyModel

    if not src.is_file():
        raise BadInput(f"latency table {src} does not exist")
    model = LatencyModel.load(src)
    here = measuring_device(model.settings)
    if model.measured_elsewhere(here):  # the bench compares methods by what they measure: on the table's device
        raise BadInput(
            f"latency table {src} was measured on device {model.device.get('id')} ({model.device.get('device', '?')},"
            f" {model.device.get('measured_on', '?')}), this bench would measure on {here['id']} ({here['device']}); "
            "every method is compared by measurement: pass --timer URL of that device, or profile here"
        )
    if src.resolve() != table.resolve():
        model.save(table)
    log(f"bench: sharing the latency table {src} (floor {model.floor_ms:.4f} ms, {model.provider})")
    return model


def _run_method(spec: dict, out: Path, log) -> dict:
    """One run in a fresh process (its peak memory is its own) -> its row, or a row with the error."""
    m, run = spec["method"], spec["run"]
    result = out / f"{run}.json"
    result.unlink(missing_ok=True)
    shutil.rmtree(out / run, ignore_errors=True)  # a fresh run directory per run
    log(f"-> {run} (own process)")
    proc = subprocess.run(
        [sys.executable, "-m", "flexslim.bench", json.dumps(spec), str(result)],
        capture_output=True,
        text=True,
        env=child_env(),  # the worker dies with this process
    )
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        log(f"   {run} failed: {' | '.join(tail)}")
        return {"method": m, "seed": spec.get("seed"), "error": " | ".join(tail)}
    row = json.loads(result.read_text())
    log(run_line(run, row))
    return row


def run_line(run: str, row: dict) -> str:
    """The log line of one finished run: what a row holds (a baseline has no tensor window, a ceiling or prune row
    no memory figure of its own search), never a KeyError that would stop the other runs."""
    tensor, peak, acc = row.get("tensor_peak_mb"), row.get("peak_mb"), row.get("acc_retrained")
    return (
        f"   {run}: widths {row['widths']}, {row['measured_ms']:.4f} ms measured / {row['predicted_ms']:.4f} "
        f"predicted ({'met' if row['budget_met'] else 'MISSED'}), search {row.get('search_seconds') or 0:.0f}s"
        + (f", tensors {tensor:.1f} MB" if tensor is not None else "")
        + (f", peak RSS {peak:.0f} MB" if peak is not None else "")
        + (f", retrained accuracy {acc:.4f}" if acc is not None else "")
    )
