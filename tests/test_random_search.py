"""Random search, the baseline every width search must beat: candidates inside the budget, each trained briefly,
the best on D_s kept, within its time allowance."""

from __future__ import annotations

import random

import torch
from search_fixtures import hand_latency_model

from flexslim.bench.random_search import MIN_CANDIDATES, inside_budget, random_search
from flexslim.data.sources import load_dataset
from flexslim.latency.budget import Budget
from flexslim.models.arch import Arch
from flexslim.recipe.schema import load_recipe

SMALL = ["data.image_size=8", "search.batch_size=64", "model.round_to=8"]


def _setup():
    recipe = load_recipe("quickstart", SMALL)
    ds = load_dataset(recipe.data)
    arch = Arch.for_data(recipe.model, ds)
    table = hand_latency_model(arch, recipe.latency)
    budget = Budget(float(table.predict(arch.widths)), headroom=0.03)
    return recipe, ds, arch, table, budget


def test_every_candidate_is_predicted_inside_the_window_and_on_the_grid():
    recipe, _, arch, table, budget = _setup()
    pool = inside_budget(arch, table, budget, 8, recipe.model.min_width, random.Random(0))
    assert len(pool) > 5 and len({tuple(sorted(w.items())) for w in pool}) == len(pool)
    for w in pool:
        assert budget.low_ms <= float(table.predict(w)) <= budget.limit_ms
        assert all(v % 8 == 0 and v >= recipe.model.min_width for v in w.values())


def test_under_a_grid_of_16_candidates_take_min_width_or_multiples_of_16():
    """8 (min_width) and 16, 32, 48 ... - never 24 or 40, which a 16-channel block charges as 32 and 48."""
    recipe, _, arch, table, _ = _setup()
    budget = Budget(float(table.predict({s: 2 * w for s, w in arch.widths.items()})), headroom=0.03, window=0.9)
    pool = inside_budget(arch, table, budget, 16, 8, random.Random(0))
    seen = {v for w in pool for v in w.values()}
    assert 8 in seen and 16 in seen and all(v == 8 or v % 16 == 0 for v in seen)


def test_random_search_keeps_the_best_scoring_candidate_and_respects_its_time():
    recipe, ds, arch, table, budget = _setup()
    res = random_search(arch, recipe, ds, table=table, budget=budget, seconds=0.0, device=torch.device("cpu"))
    assert len(res.candidates) == MIN_CANDIDATES  # no time: the minimum, no more
    assert res.score == max(c["score"] for c in res.candidates) and 0.0 <= res.score <= 1.0
    assert res.widths in [c["widths"] for c in res.candidates]
    assert all(budget.low_ms <= c["predicted_ms"] <= budget.limit_ms for c in res.candidates)
    longer = random_search(arch, recipe, ds, table=table, budget=budget, seconds=3 * res.seconds,
                           device=torch.device("cpu"))  # fmt: skip
    assert len(longer.candidates) > MIN_CANDIDATES and longer.seconds < 3 * res.seconds + 2 * max(
        c["seconds"] for c in longer.candidates
    )
