"""The per-method bench worker: one bench run (a method at one seed) in its own fresh process, started by
`flexslim.bench.run` as `python -m flexslim.bench SPEC_JSON RESULT_PATH` (`bench/__main__.py`) -> the run's row
(JSON). A searched method's row (the search job, its memory window) is here; the baselines' are `bench.baselines`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flexslim.bench.baselines import budget_for, ceiling_row, prune_row, random_row, uniform_row
from flexslim.bench.compute import search_gmacs, train_gmacs, train_images
from flexslim.bench.report import WINDOW_STEPS
from flexslim.recipe.choices import BenchMethod
from flexslim.search.methods import bench_method
from flexslim.system.children import adopt_from_env
from flexslim.system.files import atomic_write_json
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
    rows = {None: _search_row, "uniform": uniform_row, "random": random_row, "ceiling": ceiling_row,
            "prune": prune_row}  # fmt: skip
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
        compute.update(train_gmacs=train_gmacs(res.arch, res.arch.widths, epochs, train_images(ds, recipe)),
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
    budget = budget_for(spec["budget_ms"], recipe, latency)
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


def main(argv: list[str]) -> None:
    """The per-method worker process (`python -m flexslim.bench SPEC_JSON RESULT_PATH`): its row, written atomically."""
    adopt_from_env()
    spec_json, result_path = argv[0], Path(argv[1])
    atomic_write_json(result_path, worker(json.loads(spec_json)))
