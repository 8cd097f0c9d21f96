"""Every recipe value checked: one rule per `section.key` (RULES, from `checks`), the named choices read from
their tables, and the cross-field checks (stage layout, widths vs min_width and round_to). `config.recipe_from_dict`
calls `check_recipe` on every recipe it builds; a failure is BadInput naming the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flexslim.errors import BadInput
from flexslim.recipe import checks
from flexslim.recipe.choices import DATASET_CHANNELS, DATASETS
from flexslim.recipe.schema import RECIPE_NAME, Recipe, SearchConfig

# -- the rules ----------------------------------------------------------------------------------------------
Rule = Callable[[Any, checks.Origin], Any]
_SEED_CAP = 2**32 - 1  # numpy / scikit-learn seeds
_DMASK_RANGES = tuple(
    f.name.removeprefix("dmask_") for f in dataclasses.fields(SearchConfig) if f.name in ("dmask_small", "dmask_large")
)


def _count(low: int = 1, cap: int | None = None) -> Rule:
    return lambda v, o: checks.count(v, o, low=low, cap=cap)


def _below_one(v: Any, o: checks.Origin) -> float:
    return checks.fraction(v, o, below_one=True)


def _seed(v: Any, o: checks.Origin) -> int:
    return checks.count(v, o, low=0, cap=_SEED_CAP)


def _channels(v: Any, o: checks.Origin) -> int:
    if checks.count(v, o, low=0, cap=3) == 2:
        raise BadInput(f"{o.label} = 2: must be 0 (as the images are), 1 (grey) or 3 (colour); {o.fix}")
    return v


def _width_range(v: Any, o: checks.Origin) -> tuple[float, float]:
    lo, hi = (checks.positive(x, o) for x in v)
    if lo > hi:
        raise BadInput(f"{o.label} = {list(v)!r}: must be [low, high] with low <= high; {o.fix}")
    return lo, hi


# every number (and named choice) of every section, checked after loading; a test keeps this table complete
RULES: dict[str, Rule] = {
    "data.image_size": _count(cap=checks.MAX_IMAGE_SIZE),
    "data.crop_padding": _count(low=0, cap=checks.MAX_IMAGE_SIZE),
    "data.cutout": _count(low=0, cap=checks.MAX_IMAGE_SIZE),
    "data.split_seed": _seed,
    "data.resized_crop": lambda v, o: checks.finite(v, o, low=0.0, high=1.0),
    "data.channels": _channels,
    "data.max_in_memory_mb": _count(cap=10_000_000),
    "data.max_pixels": _count(cap=checks.MAX_IMAGE_PIXELS),
    "data.train_subset": _count(low=0, cap=10_000_000),  # images per class; 0 = all
    "model.stem_width": _count(cap=checks.MAX_WIDTH),
    "model.head_width": _count(low=0, cap=checks.MAX_WIDTH),
    "model.min_width": _count(cap=checks.MAX_WIDTH),
    "model.round_to": _count(low=0, cap=checks.MAX_WIDTH),  # 0 = the runtime's channel block
    "model.drop_path": _below_one,
    "model.auxiliary_weight": checks.non_negative,
    "train.epochs": _count(cap=checks.MAX_EPOCHS),
    "train.batch_size": checks.batch,
    "train.lr": checks.positive,
    "train.momentum": _below_one,
    "train.weight_decay": checks.non_negative,
    "train.grad_clip": checks.positive,
    "train.seed": _seed,
    "search.epochs": _count(cap=checks.MAX_EPOCHS),
    "search.batch_size": checks.batch,
    "search.lr": checks.positive,
    "search.momentum": _below_one,
    "search.weight_decay": checks.non_negative,
    "search.grad_clip": checks.positive,
    "search.arch_lr": checks.positive,
    "search.arch_beta1": _below_one,
    "search.arch_beta2": _below_one,
    "search.sigma": checks.positive,
    "search.step": _count(cap=checks.MAX_WIDTH),
    "search.k_sigma": checks.positive,
    "search.hysteresis": checks.non_negative,
    "search.dual_lr": checks.non_negative,
    "search.init_multiplier": checks.non_negative,
    "search.average_last": lambda v, o: checks.finite(v, o, low=0.0, high=1.0, low_open=True),
    "search.warmup": lambda v, o: checks.finite(v, o, low=0.0, high=0.9),
    "search.dmask_small": _width_range,
    "search.dmask_large": _width_range,
    "search.dmask_step": _count(cap=checks.MAX_WIDTH),
    "search.dmask_lr": checks.positive,
    "search.tau0": checks.positive,
    "search.tau_final": checks.positive,
    "search.seed": _seed,
    "latency.batch": checks.batch,
    "latency.threads": checks.threads,
    "latency.warmup": checks.warmup,
    "latency.runs": checks.runs,
    "latency.min_seconds": checks.min_seconds,
    "latency.bake_seconds": checks.min_seconds,
    "latency.tolerance": checks.tolerance,
    "latency.bake_tolerance": checks.tolerance,
    "latency.calibration": _count(cap=100_000),
    "latency.timeout": checks.timeout,
    "latency.percentile": checks.percentile,
    "latency.samples": _count(cap=10_000),
    "latency.holdout": _count(low=0, cap=10_000),
    "latency.repeats": _count(cap=100),
    "latency.near": _count(low=0, cap=1000),
    "latency.confidence": checks.non_negative,
    "bench.latency_ms": lambda v, o: v if v == 0 else checks.budget_ms(v, o),  # 0 = pass --latency-ms
    "bench.random_seconds": checks.positive,
    "bench.ceiling_networks": _count(cap=1000),
    "bench.prune_start": lambda v, o: checks.finite(v, o, low=1.0, high=8.0),  # >= 1: pruned down from it
}


def _choices() -> dict[str, tuple[str, ...]]:
    """The named choices, each read from its one table (imported here: config sits below those modules)."""
    from flexslim.recipe.choices import (
        BAKE_RANKS,
        FAMILIES,
        INT8_FORMATS,
        PRECISIONS,
        PROVIDERS,
        SEARCH_METHODS,
        TRAIN_INITS,
    )

    return {
        "data.dataset": DATASETS,
        "model.family": tuple(FAMILIES),
        "search.method": tuple(SEARCH_METHODS),
        "search.dmask_range": _DMASK_RANGES,
        "search.bake_rank": BAKE_RANKS,
        "train.init": TRAIN_INITS,
        "latency.provider": PROVIDERS,
        "latency.precision": PRECISIONS,
        "latency.int8_format": ("auto", *INT8_FORMATS),
    }


def check_recipe(recipe: Recipe, source: str | None = None) -> Recipe:
    """Check every value of a recipe through `flexslim.recipe.checks`; else BadInput (one line: key, value, fix)."""
    if not RECIPE_NAME.fullmatch(recipe.name):
        raise BadInput(
            f"recipe name {recipe.name[:80]!r}"
            + (f" ({source})" if source else "")
            + ": use 1-64 characters from A-Z a-z 0-9 . _ - (not starting with '.'); it names the run directory"
        )
    for key, allowed in _choices().items():
        section, name = key.split(".")
        checks.choice(getattr(getattr(recipe, section), name), checks.recipe_key(key, source), allowed)
    for key, rule in RULES.items():
        section, name = key.split(".")
        rule(getattr(getattr(recipe, section), name), checks.recipe_key(key, source))
    from flexslim.recipe.choices import BENCH_METHODS

    for i, m in enumerate(recipe.bench.methods):
        checks.choice(m, checks.recipe_key(f"bench.methods[{i}]", source), BENCH_METHODS)
    _check_stages(recipe, source)
    if recipe.search.warmup + recipe.search.average_last > 1.0:
        raise BadInput(
            f"recipe keys search.warmup = {recipe.search.warmup} and search.average_last = "
            f"{recipe.search.average_last}{f' ({source})' if source else ''}: the averaged end of the search would "
            "include warm-up steps (mu not yet searched); keep warmup + average_last <= 1"
        )
    channels = DATASET_CHANNELS[recipe.data.dataset]
    sample = (channels, recipe.data.image_size, recipe.data.image_size)
    for key in ("latency.batch", "train.batch_size", "search.batch_size"):
        section, name = key.split(".")
        checks.batch(getattr(getattr(recipe, section), name), checks.recipe_key(key, source), sample)
    return recipe


def _check_stages(recipe: Recipe, source: str | None) -> None:
    stages = recipe.model.stages
    if not stages:
        raise BadInput(f"recipe key model.stages{f' ({source})' if source else ''}: needs at least one stage")
    seen: set[str] = set()
    for i, s in enumerate(stages):
        where = f"model.stages[{i}]"
        if not s.name or s.name in seen:
            raise BadInput(
                f"recipe key {where}.name = {s.name!r}{f' ({source})' if source else ''}: stage names must be "
                "non-empty and unique; rename the stage"
            )
        seen.add(s.name)
        checks.count(s.width, checks.recipe_key(f"{where}.width", source), cap=checks.MAX_WIDTH)
        checks.count(s.blocks, checks.recipe_key(f"{where}.blocks", source), cap=1000)
        checks.count(s.stride, checks.recipe_key(f"{where}.stride", source), cap=16)
