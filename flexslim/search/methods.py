"""The one table of search methods, and the one table of what `flexslim bench` compares.

A search method names how a stage's option weights are made (its mask kind); the table resolves the
name to the mask factory lazily (`module:function`), so the CLI reads the names without importing torch.

    SEARCH_METHODS["flexcharts"]  -> GaussianMask per stage (this tool's method)
    SEARCH_METHODS["dmask"]       -> GumbelMask per stage over a fixed range (DMaskingNAS baseline)

Bench methods are recipe overrides on top of a search method, or `uniform` (no search: one width
multiplier fitted to the measured latency).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from flexslim.errors import BadInput
from flexslim.recipe.choices import BENCH_METHODS, SEARCH_METHODS, BenchMethod


def check_search_method(name: str) -> str:
    """`name` if it is a search method, else BadInput listing the valid ones."""
    if name not in SEARCH_METHODS:
        raise BadInput(f"unknown search.method '{name}'; valid: {', '.join(SEARCH_METHODS)}")
    return name


def mask_factory(name: str) -> Callable:
    """The function (arch, model_cfg, search_cfg) -> {stage: mask} of search method `name`."""
    module, _, attr = SEARCH_METHODS[check_search_method(name)].partition(":")
    return getattr(importlib.import_module(module), attr)


def bench_method(name: str) -> BenchMethod:
    """The bench method `name`; BadInput listing the valid ones otherwise."""
    if name not in BENCH_METHODS:
        raise BadInput(f"unknown bench method '{name}'; valid: {', '.join(BENCH_METHODS)}")
    return BENCH_METHODS[name]
