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

from flexslim.bench.report import WINDOW_STEPS, write_outputs
from flexslim.errors import BadInput
from flexslim.latency.budget import Budget
from flexslim.recipe.choices import BenchMethod
from flexslim.search.methods import bench_method
from flexslim.system.children import adopt_from_env, child_env
from flexslim.system.files import atomic_write_json
from flexslim.system.memory import SearchMemory


def network_stats(arch) -> dict:
    """MFLOPs (torch's FlopCounterMode, one image) and parameters (thousands) of the dense network."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from flexslim.models.families import build_network

    net = build_network(arch).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.rand(1, *arch.input_shape))
    return {"mflops": counter.get_total_flops() / 1e6, "params_k": sum(p.numel() for p in net.parameters()) / 1e3}


def worker(spec: dict) -> dict:
    """One bench run (a method at one seed), in this (fresh) process: search (or uniform scaling) -> its row."""
    from flexslim.data.sources import load_dataset
    from flexslim.latency.model import LatencyModel
    from flexslim.recipe.schema import load_recipe
    from flexslim.system.devices import pick_device

    method = bench_method(spec["method"])
    recipe = load_recipe(spec["recipe"], run_overrides(spec, method))
    dev = pick_device(spec["device"])
    ds = load_dataset(recipe.data, spec.get("data"))  # warm the data path so the memory baseline includes it
    t0 = time.perf_counter()
    run = {None: _search_row, "uniform": _uniform_row, "random": _random_row}[method.baseline]
    row, baked = run(spec, method, recipe, ds, dev)
    table = LatencyModel.load(spec["latency_table"])
    row.update(
        method=method.name,
        seed=recipe.search.seed,
        dataset=ds.name,
        budget_ms=spec["budget_ms"],
        widths=baked.widths,
        predicted_ms=float(table.predict(baked.widths)),
        budget_met=row["measured_ms"] <= spec["budget_ms"],
        wall_seconds=time.perf_counter() - t0,
        device=str(dev),
        **network_stats(baked),
    )
    if method.search == "dmask":
        row["range_ms"] = _range_ms(recipe, table)
    return row


def run_overrides(spec: dict, method: BenchMethod) -> list[str]:
    """The recipe overrides of one run: the bench's, the method's, the run's seed (search and retraining)."""
    seed = [f"search.seed={spec['seed']}", f"train.seed={spec['seed']}"] if spec.get("seed") is not None else []
    searched = [f"search.method={method.search}", *method.overrides] if method.search else []
    return [*spec["overrides"], *searched, *seed]


def _range_ms(recipe, table) -> list[float]:
    """Predicted latency of a DMask range's narrowest and widest networks (every stage at its first / last option)."""
    from flexslim.search.masks import dmask_options

    cfg = recipe.search
    low, high = cfg.dmask_small if cfg.dmask_range == "small" else cfg.dmask_large
    opts = {
        s.name: dmask_options(s.width, low, high, cfg.dmask_step, recipe.model.min_width) for s in recipe.model.stages
    }
    return [
        float(table.predict({k: o[0] for k, o in opts.items()})),
        float(table.predict({k: o[-1] for k, o in opts.items()})),
    ]


def _search_row(spec: dict, method: BenchMethod, recipe, ds, dev) -> tuple[dict, object]:
    """A searched method: the search job on the bench's shared latency table (its measured bake to the window, as
    for every method), then the tensor-memory window at the widest allocation the search used."""
    from flexslim.jobs.search import SearchRequest, search_job

    request = SearchRequest(
        spec["budget_ms"],
        recipe=spec["recipe"],
        overrides=tuple(run_overrides(spec, method)),
        data_dir=spec.get("data"),
        run_dir=Path(spec["out"]) / spec["run"],
        device=spec["device"],
        latency_table=Path(spec["latency_table"]),
        retrain=spec["retrain"],
        mark=False,
    )
    res = search_job(request)
    history = res.history or []
    search_seconds = res.search_seconds  # the loop alone: the search measures nothing (latency_seconds apart)
    row = {
        "search_seconds": search_seconds,
        "latency_seconds": res.latency_seconds,
        "epochs": len(history),
        "seconds_per_epoch": search_seconds / len(history) if history else None,
        "measured_ms": res.fitted.measured_ms,
        "allocated": history[-1]["allocated"] if history else None,
        "peak_allocated": widest_allocation(history),
        "acc_supernet": res.supernet_acc,
        "acc_retrained": res.test_acc,
        **(res.memory or {}),
    }
    row.update(search_window_memory(spec, recipe, ds, dev, row["peak_allocated"]))
    return row, res.arch


def widest_allocation(history: list[dict]) -> dict[str, int] | None:
    """Per stage, the most channels the kernels held in any epoch of the search (None without a history)."""
    if not history:
        return None
    allocs = [h["allocated_before"] for h in history] + [h["allocated"] for h in history]
    return {k: max(a[k] for a in allocs) for k in allocs[0]}


def search_window_memory(spec: dict, recipe, ds, dev, allocation: dict[str, int] | None) -> dict:
    """memory.tensor_peak over WINDOW_STEPS steps of the search loop (flexslim.search.loop's own step functions) on a
    fresh supernet of this method at `allocation` (the widest the search used; default: the starting one)."""
    from flexslim.data.augment import Augment
    from flexslim.latency.model import LatencyModel
    from flexslim.models.arch import Arch
    from flexslim.search.loop import SearchLoop, arch_step, build_state, search_batches, weight_sgd, weight_step
    from flexslim.system.console import Reporter
    from flexslim.system.memory import tensor_peak

    arch = Arch.for_data(recipe.model, ds)
    latency = LatencyModel.load(spec["latency_table"])
    latency.arch = arch
    st = build_state(arch, recipe, dev)
    if allocation and allocation != st.supernet.allocated():
        st.supernet.reallocate(allocation)
        st.w_opt = weight_sgd(st.supernet, recipe.search)
    ds = ds.to(dev)
    bt, bs = search_batches(ds, recipe, 0)
    budget = _budget(spec["budget_ms"], recipe, latency)
    loop = SearchLoop(recipe, budget, latency, dev, Reporter(), min(len(bt), len(bs)))
    augment = Augment(recipe.data, seed=recipe.search.seed)
    st.supernet.train()
    st.supernet.start_epoch(0, recipe.search.epochs, recipe.search)

    def pairs():
        while True:
            yield from zip(bt, bs)

    batches = pairs()

    def step() -> None:
        (xt, yt), (xs, ys) = next(batches)
        weight_step(st, loop, augment, xt, yt)
        arch_step(st, loop, augment, xs, ys)
        st.step += 1

    return tensor_peak(step, dev, steps=WINDOW_STEPS, holders=(st.supernet, st.w_opt, st.a_opt))


def _uniform_row(spec: dict, method: BenchMethod, recipe, ds, dev) -> tuple[dict, object]:
    """Uniform scaling: one multiplier bisected on measured latency (its "search"), then the same measured bake as
    every method and optional retraining."""
    from flexslim.bench.uniform import uniform_scale
    from flexslim.latency.model import with_grid

    memory = SearchMemory(dev)
    memory.start()
    arch, table, budget = _shared(spec, recipe, ds)
    res = uniform_scale(
        arch,
        budget=budget,
        settings=recipe.latency,
        min_width=recipe.model.min_width,
        round_to=with_grid(recipe, table).model.round_to,
        measure=spec.get("measure"),
    )
    fitted = _baked(arch, res.widths, budget, table, recipe)
    # its "search" is all latency measurement: no training, no tensor memory to speak of
    row = {"search_seconds": 0.0, "latency_seconds": res.seconds + fitted.seconds, "measured_ms": fitted.measured_ms}
    row.update(memory.stop(), multiplier=res.multiplier, uniform_widths=res.widths, acc_supernet=None)
    return _retrained(row, arch.with_widths(fitted.widths), spec, recipe, ds, dev)


def _random_row(spec: dict, method: BenchMethod, recipe, ds, dev) -> tuple[dict, object]:
    """Random search within the time the FlexCHarts run of this seed searched (`random_seconds`), then the same
    measured bake as every method and optional retraining."""
    from flexslim.bench.random_search import random_search

    memory = SearchMemory(dev)
    memory.start()
    arch, table, budget = _shared(spec, recipe, ds)
    res = random_search(arch, recipe, ds, table=table, budget=budget, seconds=spec["random_seconds"], device=dev)
    fitted = _baked(arch, res.widths, budget, table, recipe)
    row = {"search_seconds": res.seconds, "latency_seconds": fitted.seconds, "measured_ms": fitted.measured_ms}
    row.update(memory.stop(), candidates=len(res.candidates), acc_random_proxy=res.score, acc_supernet=None)
    return _retrained(row, arch.with_widths(fitted.widths), spec, recipe, ds, dev)


def _shared(spec: dict, recipe, ds):
    """The run's arch, the bench's shared latency table (checked against it) and the budget every method uses."""
    from flexslim.latency.model import LatencyModel
    from flexslim.models.arch import Arch

    arch = Arch.for_data(recipe.model, ds)
    table = LatencyModel.load(spec["latency_table"])
    table.check_compatible(arch, recipe.latency, spec["latency_table"])
    return arch, table, _budget(spec["budget_ms"], recipe, table)


def _baked(arch, widths: dict, budget: Budget, table, recipe):
    """The search job's measured bake (trim, fill, exchange to the window) of a baseline's widths (no supernet: by
    latency inside the window)."""
    from flexslim.latency.model import with_grid
    from flexslim.search.bake import BakePlan, bake

    plan = BakePlan.for_recipe(with_grid(recipe, table))
    return bake(arch, {s: float(w) for s, w in widths.items()}, budget=budget, latency=table, plan=plan)


def _retrained(row: dict, baked, spec: dict, recipe, ds, dev) -> tuple[dict, object]:
    """`row` with the retrained test accuracy of `baked` when the bench retrains (None otherwise)."""
    row["acc_retrained"] = None
    if spec["retrain"]:
        from flexslim.jobs.train import train_arch

        run_dir = Path(spec["out"]) / spec["run"]
        run_dir.mkdir(parents=True, exist_ok=True)
        row["acc_retrained"] = train_arch(baked, recipe, run_dir, ds, dev)[-1].test_acc
    return row, baked


def _budget(ms: float, recipe, table) -> Budget:
    """The Budget the search job would use for `ms`: headroom from the shared table's timing spread."""
    return Budget.for_noise(ms, table.noise(), recipe.latency.confidence)


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
    out.mkdir(parents=True, exist_ok=True)
    if latency_table is not None:
        table = _reuse_latency_table(Path(latency_table), out / "latency.json", log)
    else:
        table = _shared_latency_table(recipe_name, overrides, out / "latency.json", budget, data_dir, log)
    _budget(budget, recipe, table).check_floor(table.floor_ms, table.provider, recipe.model.min_width)
    base = {
        "recipe": recipe_name,
        "overrides": overrides,
        "budget_ms": budget,
        "out": str(out),
        "latency_table": str(out / "latency.json"),
        "retrain": recipe.bench.retrain if retrain is None else retrain,
        "device": device,
        "data": str(data_dir) if data_dir else None,
    }
    rows: list[dict] = []
    for run in _runs(methods, seeds, recipe.search.seed):
        if run["method"] == "random":
            run["random_seconds"] = _random_seconds(rows, run["seed"], recipe)
        rows.append(_run_method({**base, **run}, out, log))
    write_outputs(rows, out, budget, recipe.name)
    return rows


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


def seeds_of(seeds: int | dict[str, int], methods: list[str]) -> dict[str, int]:
    """Runs per method: an int for all, or a mapping (key "*": the methods not named; else the largest count)."""
    if not isinstance(seeds, dict):
        return {m: seeds for m in methods}
    rest = seeds.get("*", max(seeds.values()))
    return {m: seeds.get(m, rest) for m in methods}


def _runs(methods: list[str], seeds: int | dict[str, int], first_seed: int) -> list[dict]:
    """The runs of a bench: every method per seed ({"method", "seed", "run": the run folder's name}), seed by seed
    (a method with fewer runs stops early); random search runs after FlexCHarts (it gets FlexCHarts' search time).
    Seeds are labelled (search.seed = train.seed = first + i) as soon as any method runs more than once."""
    methods = sorted(methods, key=lambda m: m == "random")
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
    from flexslim.latency.model import LatencyModel

    if not src.is_file():
        raise BadInput(f"latency table {src} does not exist")
    model = LatencyModel.load(src)
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
        [sys.executable, "-m", "flexslim.bench.run", json.dumps(spec), str(result)],
        capture_output=True,
        text=True,
        env=child_env(),  # the worker dies with this process
    )
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        log(f"   {run} failed: {' | '.join(tail)}")
        return {"method": m, "seed": spec.get("seed"), "error": " | ".join(tail)}
    row = json.loads(result.read_text())
    tensor = row.get("tensor_peak_mb")
    log(
        f"   {run}: widths {row['widths']}, {row['measured_ms']:.4f} ms measured / {row['predicted_ms']:.4f} "
        f"predicted ({'met' if row['budget_met'] else 'MISSED'}), search {row['search_seconds']:.0f}s, "
        + (f"tensors {tensor:.1f} MB, " if tensor is not None else "")
        + f"peak RSS {row['peak_mb']:.0f} MB"
    )
    return row


# -- summary over seeds -------------------------------------------------------------------------------------


if __name__ == "__main__":  # the per-method worker process
    adopt_from_env()
    spec_json, result_path = sys.argv[1], Path(sys.argv[2])
    atomic_write_json(result_path, worker(json.loads(spec_json)))
