"""The per-method bench worker: one bench run (a method at one seed) in its own fresh process, started by
`flexslim.bench.run` as `python -m flexslim.bench SPEC_JSON RESULT_PATH` (`bench/__main__.py`) -> the run's row
(JSON)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from flexslim.bench.compute import search_gmacs, train_gmacs
from flexslim.bench.report import WINDOW_STEPS
from flexslim.latency.budget import Budget
from flexslim.recipe.choices import BenchMethod
from flexslim.search.methods import bench_method
from flexslim.system.children import adopt_from_env
from flexslim.system.files import atomic_write_json
from flexslim.system.memory import SearchMemory
from flexslim.system.runs import RunRecord


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
    rows = {None: _search_row, "uniform": _uniform_row, "random": _random_row, "ceiling": _ceiling_row,
            "prune": _prune_row}  # fmt: skip
    run = rows[method.baseline]
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
    row["total_gmacs"] = row.get("search_gmacs", 0.0) + (row.get("train_gmacs") or 0.0)  # what its accuracy cost
    if method.search == "dmask":
        row["range_ms"] = _range_ms(recipe, table)
    return row


def run_overrides(spec: dict, method: BenchMethod) -> list[str]:
    """The recipe overrides of one run: retraining from scratch (every method alike: a baseline has no searched
    weights to start from; the bench's own --set may still say otherwise; with --equal-compute the recipe's own
    train.init, flexslim's route: a FlexCHarts run that trained from scratch after its search would be charged for
    a search it did not use), the bench's, the method's, the run's seed (search and retraining)."""
    seed = [f"search.seed={spec['seed']}", f"train.seed={spec['seed']}"] if spec.get("seed") is not None else []
    searched = [f"search.method={method.search}", *method.overrides] if method.search else []
    scratch = [] if spec.get("equal_compute") else [SCRATCH]
    return [*scratch, *spec["overrides"], *searched, *seed]


SCRATCH = "train.init=scratch"  # the bench compares what the methods find, not how long their networks trained


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
    compute = {"search_gmacs": search_gmacs(res.arch, history, recipe.search.batch_size)}
    if spec["retrain"]:
        run = RunRecord.load(Path(spec["out"]) / spec["run"])
        epochs = recipe.train.epochs
        compute.update(train_gmacs=train_gmacs(res.arch, res.arch.widths, epochs, _train_images(ds, recipe)),
                       train_seconds=run.get("train_seconds"), train_epochs=epochs)  # fmt: skip
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
        "train_init": recipe.train.init,
        **compute,
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
    served = with_grid(recipe, table)  # the table's grid and int8 format
    res = uniform_scale(
        arch,
        budget=budget,
        settings=served.latency,
        min_width=recipe.model.min_width,
        round_to=served.model.round_to,
        measure=spec.get("measure"),
    )
    fitted = _baked(arch, res.widths, budget, table, recipe)
    # its "search" is all latency measurement: no training, no tensor memory to speak of
    row = {"search_seconds": 0.0, "latency_seconds": res.seconds + fitted.seconds, "measured_ms": fitted.measured_ms,
           "search_gmacs": 0.0}  # fmt: skip
    row.update(memory.stop(), multiplier=res.multiplier, uniform_widths=res.widths, acc_supernet=None)
    row.update(bake_record(fitted))
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
    row = {"search_seconds": res.seconds, "latency_seconds": fitted.seconds, "measured_ms": fitted.measured_ms,
           "search_gmacs": _random_gmacs(arch, res.candidates, ds, recipe)}  # fmt: skip
    row.update(memory.stop(), candidates=len(res.candidates), acc_random_proxy=res.score, acc_supernet=None)
    row.update(bake_record(fitted))
    return _retrained(row, arch.with_widths(fitted.widths), spec, recipe, ds, dev)


def _ceiling_row(spec: dict, method: BenchMethod, recipe, ds, dev) -> tuple[dict, object]:
    """The reachable ceiling: `bench.ceiling_networks` random networks predicted inside the window (`inside_budget`,
    the run's seed), each through the same measured bake and retrained from scratch; the row is the best one by test
    accuracy (optimistic by construction: chosen on the test set) with every network in `ceiling`. Needs --retrain."""
    import random

    from flexslim.bench.random_search import inside_budget
    from flexslim.errors import BadInput

    why = "retrains every network it draws"
    memory, arch, table, budget, grid = _retraining_baseline(spec, method, recipe, ds, dev, why)
    pool = inside_budget(arch, table, budget, grid, recipe.model.min_width, random.Random(recipe.search.seed))
    t0, tried, seen = time.perf_counter(), [], set()
    for widths in pool:
        if len(tried) >= recipe.bench.ceiling_networks:
            break
        fitted = _baked(arch, widths, budget, table, recipe)
        key = tuple(sorted(fitted.widths.items()))
        if key in seen or not budget.in_window(fitted.measured_ms):
            continue  # two draws baked to one network, or one the bake could not bring into the window
        seen.add(key)
        sub = {**spec, "run": f"{spec['run']}/net{len(tried)}"}
        row, baked = _retrained({"measured_ms": fitted.measured_ms}, arch.with_widths(fitted.widths), sub, recipe,
                                ds, dev)  # fmt: skip
        tried.append({"widths": dict(baked.widths), "drawn": widths, **row})
    if not tried:
        raise BadInput(f"no random network of the family bakes into the window of {spec['budget_ms']:g} ms")
    best = max(tried, key=lambda c: c["acc_retrained"])
    accs = [c["acc_retrained"] for c in tried]
    row = {key: best[key] for key in ("measured_ms", "acc_retrained", "train_init", "train_epochs", "train_seconds")}
    row.update(
        search_seconds=0.0,
        latency_seconds=time.perf_counter() - t0 - sum(c["train_seconds"] for c in tried),
        search_gmacs=0.0,
        train_gmacs=sum(c["train_gmacs"] for c in tried),  # what knowing the ceiling cost: every network trained
        acc_supernet=None,
        candidates=len(tried),
        ceiling=tried,
        ceiling_mean=sum(accs) / len(accs),
        **memory.stop(),
    )
    return row, arch.with_widths(best["widths"])


def _prune_row(spec: dict, method: BenchMethod, recipe, ds, dev) -> tuple[dict, object]:
    """Prune and fine-tune: the family at `bench.prune_start` x its widths trained with the recipe (from scratch),
    a uniform ratio bisected on measured latency and the same measured bake as every method give the widths, the
    trained network's channels are pruned to them (`bench.prune`: group L2 magnitude over Torch-Pruning's
    dependency graph) and fine-tuned; the wide training and the fine-tuning each take the recipe's epochs, or
    (--equal-compute) as many as make the route's compute FlexCHarts' (`prune_epochs`). Its "search" compute is the
    wide network's training. Needs --retrain and Torch-Pruning."""
    from flexslim.bench.prune import prune_channels, require_torch_pruning, wide_arch
    from flexslim.bench.uniform import uniform_scale
    from flexslim.jobs.train import SEARCHED, train_arch
    from flexslim.latency.model import with_grid
    from flexslim.train.checkpoint import load_model, save_model

    require_torch_pruning()  # before anything is trained
    memory, arch, table, budget, grid = _retraining_baseline(
        spec, method, recipe, ds, dev, "fine-tunes the network it prunes"
    )
    wide = wide_arch(arch, recipe.bench.prune_start, grid)
    run_dir = Path(spec["out"]) / spec["run"]
    (run_dir / "wide").mkdir(parents=True, exist_ok=True)
    # the widths first (bisection and bake need the table, not the trained network): at equal compute they decide
    # how many epochs the wide training and the fine-tuning get
    settings = with_grid(recipe, table).latency
    res = uniform_scale(arch, budget=budget, settings=settings, min_width=recipe.model.min_width, round_to=grid,
                        measure=spec.get("measure"))  # fmt: skip
    fitted = _baked(arch, res.widths, budget, table, recipe)
    pruned = arch.with_widths(fitted.widths)
    epochs = prune_epochs(spec.get("compute_gmacs"), wide, pruned, recipe, ds)
    t0 = time.perf_counter()
    scratch = replace(recipe, train=replace(recipe.train, init="scratch", epochs=epochs))
    wide_acc = train_arch(wide, scratch, run_dir / "wide", ds, dev)[-1].test_acc
    wide_seconds = time.perf_counter() - t0
    _, model, _ = load_model(run_dir / "wide" / "model.pt")
    save_model(run_dir / SEARCHED, pruned, prune_channels(model, wide, fitted.widths), recipe,
               {"note": f"pruned from {wide.widths} (trained {epochs} epochs)"})  # fmt: skip
    search_gmacs = train_gmacs(wide, wide.widths, epochs, _train_images(ds, recipe))
    tune = replace(recipe, train=replace(recipe.train, init="searched", epochs=epochs))
    t1 = time.perf_counter()
    acc = train_arch(pruned, tune, run_dir, ds, dev)[-1].test_acc
    row = {
        "search_seconds": wide_seconds,  # its "search": training the wide network
        "latency_seconds": res.seconds + fitted.seconds,
        "measured_ms": fitted.measured_ms,
        "search_gmacs": search_gmacs,
        "acc_supernet": None,
        "acc_wide": wide_acc,
        "wide_widths": wide.widths,
        "wide_epochs": epochs,
        "multiplier": res.multiplier,
        "acc_retrained": acc,
        "train_init": "pruned",
        "train_epochs": epochs,
        "train_seconds": time.perf_counter() - t1,
        "train_gmacs": train_gmacs(pruned, pruned.widths, epochs, _train_images(ds, recipe)),
        **memory.stop(),
        **bake_record(fitted),
    }
    return row, pruned


def _retraining_baseline(spec: dict, method: BenchMethod, recipe, ds, dev, why: str):
    """The start of a baseline that retrains what it finds (ceiling, prune): BadInput without --retrain (`why` says
    what it retrains), then its memory reading started, the shared arch, table and budget, and the width grid."""
    from flexslim.errors import BadInput
    from flexslim.latency.model import with_grid

    if not spec["retrain"]:
        raise BadInput(f"bench method {method.name} {why}: pass --retrain")
    memory = SearchMemory(dev)
    memory.start()
    arch, table, budget = _shared(spec, recipe, ds)
    return memory, arch, table, budget, with_grid(recipe, table).model.round_to


def _random_gmacs(arch, candidates: list[dict], ds, recipe) -> float:
    """Random search's training: each candidate PROXY_EPOCHS over D_t (and one forward pass over D_s to score it)."""
    from flexslim.bench.compute import forward_macs
    from flexslim.bench.random_search import PROXY_EPOCHS

    d_t, d_s = ds.search_halves(recipe.data.split_seed)
    bs = recipe.search.batch_size
    n_t, n_s = len(d_t.train_batches(bs, drop_last=True)) * bs, len(d_s.train_batches(bs)) * bs
    return sum(
        train_gmacs(arch, c["widths"], PROXY_EPOCHS, n_t) + forward_macs(arch, c["widths"]) * n_s / 1e9
        for c in candidates
    )


def _epochs_for(target_gmacs: float | None, search: float, baked, recipe, ds) -> int:
    """Retraining epochs: the recipe's, or (--equal-compute) as many whole epochs as bring this run's compute
    closest to `target_gmacs` (FlexCHarts' search + retraining), at least one."""
    if not target_gmacs:
        return recipe.train.epochs
    per_epoch = train_gmacs(baked, baked.widths, 1, _train_images(ds, recipe))
    return max(1, round((target_gmacs - search) / per_epoch))


def prune_epochs(target_gmacs: float | None, wide, pruned, recipe, ds) -> int:
    """Epochs of the prune route's wide training and, as many again, of its fine-tuning: the recipe's, or
    (--equal-compute) as many whole epochs of both as bring its compute closest to `target_gmacs` (FlexCHarts'
    search + retraining of the same seed), at least one. The route keeps the recipe's even split: a prune route given
    FlexCHarts' compute spends it as a user following the recipe would, not all on the wide network."""
    if not target_gmacs:
        return recipe.train.epochs
    images = _train_images(ds, recipe)
    per_epoch = train_gmacs(wide, wide.widths, 1, images) + train_gmacs(pruned, pruned.widths, 1, images)
    return max(1, round(target_gmacs / per_epoch))


def _train_images(ds, recipe) -> int:
    """Images one retraining epoch passes through (whole batches of the training split)."""
    bs = recipe.train.batch_size
    return len(ds.train_batches(bs)) * bs


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


def bake_record(fitted) -> dict:
    """What a baseline row keeps of its bake (a search's run.json keeps the same): every gate-length timing as a
    step, the screens, and why it lands under the window when it does - so that a baseline that misses the window
    can be read as a searched run can."""
    return {"bake": fitted.steps, "bake_screens": fitted.screens, "window_note": fitted.note}


def _retrained(row: dict, baked, spec: dict, recipe, ds, dev) -> tuple[dict, object]:
    """`row` with the retrained test accuracy of `baked` when the bench retrains (None otherwise)."""
    row["acc_retrained"] = None
    if spec["retrain"]:
        from flexslim.jobs.train import train_arch

        run_dir = Path(spec["out"]) / spec["run"]
        run_dir.mkdir(parents=True, exist_ok=True)
        epochs = _epochs_for(spec.get("compute_gmacs"), row.get("search_gmacs", 0.0), baked, recipe, ds)
        train = replace(recipe.train, init="scratch", epochs=epochs)  # no searched weights: from scratch
        t0 = time.perf_counter()
        row["acc_retrained"] = train_arch(baked, replace(recipe, train=train), run_dir, ds, dev)[-1].test_acc
        row.update(
            train_init="scratch",
            train_epochs=epochs,
            train_seconds=time.perf_counter() - t0,
            train_gmacs=train_gmacs(baked, baked.widths, epochs, _train_images(ds, recipe)),
        )
    return row, baked


def _budget(ms: float, recipe, table) -> Budget:
    """The Budget the search job would use for `ms`: headroom from the shared table's timing spread, at least what
    re-timings moved on this device."""
    from flexslim.latency import rechecks

    floor = rechecks.floor(rechecks.device_of(recipe.latency)).value
    return Budget.for_noise(ms, table.noise(), recipe.latency.confidence, floor)


def main(argv: list[str]) -> None:
    """The per-method worker process (`python -m flexslim.bench SPEC_JSON RESULT_PATH`): its row, written atomically."""
    adopt_from_env()
    spec_json, result_path = argv[0], Path(argv[1])
    atomic_write_json(result_path, worker(json.loads(spec_json)))
