"""Random search, the floor every width search must clear: width vectors drawn on the grid inside the budget (by the
shared latency table's prediction), each trained briefly on D_t and scored on D_s, the best kept - within the same
search time as the searched method it is compared with.

    res = random_search(arch, recipe, ds, table=lat, budget=b, seconds=60.0, device=dev)
    res.widths, res.score, res.candidates
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from flexslim.data.augment import Augment
from flexslim.data.tensors import Dataset
from flexslim.latency.budget import Budget
from flexslim.latency.model import LatencyModel
from flexslim.latency.profiling import grid_widths
from flexslim.models.arch import Arch
from flexslim.recipe.schema import Recipe
from flexslim.system.console import Reporter

DRAWS = 20_000  # width vectors drawn at most to find ones predicted inside the window
MIN_CANDIDATES = 2  # trained whatever the time allowance
PROXY_EPOCHS = 1.0  # passes over D_t per candidate


@dataclass(frozen=True)
class RandomResult:
    """The best candidate (D_s accuracy after its short training), every candidate tried, and the time spent."""

    widths: dict[str, int]
    score: float
    candidates: list[dict] = field(default_factory=list)  # {"widths", "predicted_ms", "score", "seconds"}
    seconds: float = 0.0


def inside_budget(
    arch: Arch, table: LatencyModel, budget: Budget, grid: int, min_width: int, rng: random.Random
) -> list[dict[str, int]]:
    """Distinct width vectors on the grid (min_width and the grid's multiples up to twice the recipe's width per
    stage: `profiling.grid_widths`) whose predicted latency lies in [budget.low_ms, budget.limit_ms], in the order
    drawn."""
    choices = {s: grid_widths(min_width, max(2 * w, min_width + grid), grid) for s, w in arch.widths.items()}
    seen, inside = set(), []
    for _ in range(DRAWS):
        w = {s: rng.choice(opts) for s, opts in choices.items()}
        key = tuple(sorted(w.items()))
        if key in seen:
            continue
        seen.add(key)
        if budget.low_ms <= float(table.predict(w)) <= budget.limit_ms:
            inside.append(w)
    return inside


def random_search(
    arch: Arch,
    recipe: Recipe,
    ds: Dataset,
    *,
    table: LatencyModel,
    budget: Budget,
    seconds: float,
    device: torch.device,
    reporter: Reporter | None = None,
) -> RandomResult:
    """Train candidates drawn inside the budget (`inside_budget`) one after another, PROXY_EPOCHS on D_t each, until
    `seconds` are spent (at least MIN_CANDIDATES), and keep the best on D_s. BadInput-free: a budget no grid vector
    is predicted inside gives the closest-below vector as its only candidate."""
    from flexslim.latency.model import with_grid

    reporter = reporter or Reporter()
    rng = random.Random(recipe.search.seed)
    grid = with_grid(recipe, table).model.round_to
    pool = inside_budget(arch, table, budget, grid, recipe.model.min_width, rng)
    if not pool:
        pool = [{s: recipe.model.min_width for s in arch.widths}]
    t0, tried = time.perf_counter(), []
    for widths in pool:
        if len(tried) >= MIN_CANDIDATES and time.perf_counter() - t0 >= seconds:
            break
        t1 = time.perf_counter()
        score = proxy_score(arch.with_widths(widths), recipe, ds, device, seed=recipe.search.seed + len(tried))
        tried.append(
            {
                "widths": widths,
                "predicted_ms": float(table.predict(widths)),
                "score": score,
                "seconds": time.perf_counter() - t1,
            }
        )
        reporter.log(f"random {len(tried)}: {widths} predicted {tried[-1]['predicted_ms']:.4f} ms, D_s acc {score:.4f}")
    best = max(tried, key=lambda c: c["score"])
    return RandomResult(best["widths"], best["score"], tried, time.perf_counter() - t0)


def proxy_score(arch: Arch, recipe: Recipe, ds: Dataset, device: torch.device, seed: int = 0) -> float:
    """D_s accuracy of the dense network at `arch` after PROXY_EPOCHS of SGD on D_t (the search's batch size, lr
    schedule and augmentation): the short training random search ranks its candidates by."""
    from flexslim.models.families import build_network
    from flexslim.system.devices import autocast, prepare, to_device_batch
    from flexslim.train.loop import evaluate_batches, make_sgd
    from flexslim.train.schedules import cosine_lr

    cfg = recipe.search
    torch.manual_seed(seed)
    net = prepare(build_network(arch), device).train()
    opt = make_sgd(net.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    d_t, d_s = ds.to(device).search_halves(recipe.data.split_seed)
    batches = d_t.train_batches(cfg.batch_size, shuffle=True, seed=seed, drop_last=True)
    augment = Augment(recipe.data, seed=seed)
    total = max(1, int(PROXY_EPOCHS * len(batches)))
    for step, (x, y) in enumerate(batches):
        if step >= total:
            break
        for g in opt.param_groups:
            g["lr"] = cosine_lr(cfg.lr, step, total)
        x, y = augment(to_device_batch(x, device)), y.to(device)
        with autocast(device):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
    return evaluate_batches(net, d_s.train_batches(cfg.batch_size), device)[1]
