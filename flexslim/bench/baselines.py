"""The bench's baselines, each a row for one run of `bench.worker`: uniform scaling, random search, the ceiling
(the best of several random networks retrained) and prune-and-fine-tune. Every one goes through the search job's
measured bake (`_baked`) on the bench's shared latency table and budget (`_shared`, `budget_for`), and is
retrained from scratch alike (`_retrained`, or the prune route's own fine-tuning), with epochs derived from
FlexCHarts' compute under --equal-compute (`_epochs_for`, `prune_epochs`)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from flexslim.bench.compute import train_gmacs, train_images
from flexslim.latency.budget import Budget
from flexslim.recipe.choices import BenchMethod
from flexslim.system.memory import SearchMemory


def uniform_row(spec: dict, method: BenchMethod, recipe, ds, dev) -> tuple[dict, object]:
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


def random_row(spec: dict, method: BenchMethod, recipe, ds, dev) -> tuple[dict, object]:
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


def ceiling_row(spec: dict, method: BenchMethod, recipe, ds, dev) -> tuple[dict, object]:
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


def prune_row(spec: dict, method: BenchMethod, recipe, ds, dev) -> tuple[dict, object]:
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
    search_gmacs = train_gmacs(wide, wide.widths, epochs, train_images(ds, recipe))
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
        "train_gmacs": train_gmacs(pruned, pruned.widths, epochs, train_images(ds, recipe)),
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
    per_epoch = train_gmacs(baked, baked.widths, 1, train_images(ds, recipe))
    return max(1, round((target_gmacs - search) / per_epoch))


def prune_epochs(target_gmacs: float | None, wide, pruned, recipe, ds) -> int:
    """Epochs of the prune route's wide training and, as many again, of its fine-tuning: the recipe's, or
    (--equal-compute) as many whole epochs of both as bring its compute closest to `target_gmacs` (FlexCHarts'
    search + retraining of the same seed), at least one. The route keeps the recipe's even split: a prune route given
    FlexCHarts' compute spends it as a user following the recipe would, not all on the wide network."""
    if not target_gmacs:
        return recipe.train.epochs
    images = train_images(ds, recipe)
    per_epoch = train_gmacs(wide, wide.widths, 1, images) + train_gmacs(pruned, pruned.widths, 1, images)
    return max(1, round(target_gmacs / per_epoch))


def _shared(spec: dict, recipe, ds):
    """The run's arch, the bench's shared latency table (checked against it) and the budget every method uses."""
    from flexslim.latency.model import LatencyModel
    from flexslim.models.arch import Arch

    arch = Arch.for_data(recipe.model, ds)
    table = LatencyModel.load(spec["latency_table"])
    table.check_compatible(arch, recipe.latency, spec["latency_table"])
    return arch, table, budget_for(spec["budget_ms"], recipe, table)


def budget_for(ms: float, recipe, table) -> Budget:
    """The Budget the search job would use for `ms`: headroom from the shared table's timing spread, at least what
    re-timings moved on this device."""
    from flexslim.latency import rechecks

    floor = rechecks.floor(rechecks.device_of(recipe.latency)).value
    return Budget.for_noise(ms, table.noise(), recipe.latency.confidence, floor)


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
            train_gmacs=train_gmacs(baked, baked.widths, epochs, train_images(ds, recipe)),
        )
    return row, baked
