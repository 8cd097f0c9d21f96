"""Helpers shared by the search-module tests (masks, supernet, transplant, latency, trim, search, pipeline).

Kept out of conftest.py on purpose: plain functions and constants, imported by the test files that need them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from flexslim.models.arch import Arch
from flexslim.recipe.schema import LatencyConfig, ModelConfig, SearchConfig, StageSpec

# A small residual net: two blocks in stage a (identity shortcut inside the stage), strided stages b and c.
SMALL_STAGES = (StageSpec("a", 8, 2, 1), StageSpec("b", 16, 1, 2), StageSpec("c", 24, 1, 2))


def small_arch(head_width: int = 0, input_shape=(1, 16, 16), stages=SMALL_STAGES) -> Arch:
    return Arch(
        family="resnet",
        stages=tuple(stages),
        input_shape=tuple(input_shape),
        num_classes=10,
        dataset="quickstart",
        mean=(0.3,) * input_shape[0],
        std=(0.35,) * input_shape[0],
        stem_width=8,
        head_width=head_width,
    )


SMALL_MODEL = ModelConfig(min_width=4, round_to=4)
SMALL_SEARCH = SearchConfig(sigma=2.0, k_sigma=3.0, step=1)

# Latency settings small enough that one network takes ~0.1-0.3 s to export and time on a loaded 2-core CPU.
FAST_LATENCY = LatencyConfig(
    provider="cpu",
    batch=8,
    threads=1,
    warmup=2,
    runs=10,
    samples=4,
    holdout=2,
    min_seconds=0.0,
    bake_seconds=0.0,
    repeats=1,
    probe=False,
    near=1,
)

# --set overrides for the CLI: a tiny quickstart network and cheap latency measurements / search.
TINY_STAGE_TOML = (
    '[{ name = "stage1", width = 8, blocks = 1, stride = 1 }, '
    '{ name = "stage2", width = 16, blocks = 1, stride = 2 }, '
    '{ name = "stage3", width = 16, blocks = 1, stride = 2 }]'
)
TINY_SET = ("model.stem_width=8", f"model.stages={TINY_STAGE_TOML}")
FAST_SET = (
    "latency.samples=5",
    "latency.holdout=2",
    "latency.runs=10",
    "latency.min_seconds=0",
    "latency.bake_seconds=0",
    "latency.warmup=2",
    "latency.repeats=1",
    "latency.probe=false",
    "latency.near=1",
    "search.batch_size=128",
)


# the fields every search.jsonl line documents
HISTORY_FIELDS = {
    "epoch",
    "mu_avg",
    "mu",
    "sigma",
    "allocated",
    "expected_latency_ms",
    "multiplier",
    "weight_loss",
    "arch_ce",
    "seconds",
    "final_widths",
    "expected_widths",
    "budget_ms",
    "target_ms",
    "lr",
    "steps",
    "realloc_seconds",
}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op torch thread for the module (restored after): these networks are tiny, and two OpenMP
    threads on a busy 2-core machine make a 20 ms forward pass take up to a second. Results do not change."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sets(*overrides: str) -> list[str]:
    """['--set', a, '--set', b, ...] for a CliRunner argument list."""
    out: list[str] = []
    for o in overrides:
        out += ["--set", o]
    return out


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters (in place), so copying BN state is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def make_supernet(head_width: int = 0, seed: int = 0, input_shape=(1, 16, 16)):
    """A supernet of small_arch with Gaussian masks (sigma 2, k 3) and random BN statistics."""
    from flexslim.search.masks import gaussian_masks
    from flexslim.search.supernet import Supernet

    arch = small_arch(head_width, input_shape)
    torch.manual_seed(seed)
    sn = Supernet(arch, gaussian_masks(arch, SMALL_MODEL, SMALL_SEARCH))
    randomize_batchnorm(sn, seed)
    return sn


def inputs(sn, n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *sn.arch.input_shape, generator=torch.Generator().manual_seed(seed))


def hand_latency_model(
    arch: Arch,
    settings: LatencyConfig | None = None,
    ms_per_mmac: float = 0.05,
    intercept: float = 0.01,
    floor_ms: float | None = None,
):
    """A LatencyModel with known coefficients (no measuring): intercept + ms_per_mmac * (MACs in millions),
    valid over a huge region so the search never needs to extend it."""
    from flexslim.latency.model import LatencyModel, provider_that_runs
    from flexslim.models.families import cost_terms
    from flexslim.recipe.checks import MAX_WIDTH

    terms = sorted(cost_terms(arch, arch.widths))
    coef = [ms_per_mmac if t.startswith("macs") else 0.0 for t in terms]
    model = LatencyModel(
        arch=arch,
        settings=settings or LatencyConfig(),
        provider=provider_that_runs(settings.provider) if settings else "cpu",  # as if measured with `settings`
        runtime="hand-made",
        host="test",
        terms=terms,
        coef=coef,
        intercept=intercept,
        region={s: [1, MAX_WIDTH] for s in arch.widths},
    )
    model.floor_ms = float(model.predict({s: 1 for s in arch.widths})) if floor_ms is None else floor_ms
    return model


def hand_table(tmp: Path, overrides, scale: float = 0.9) -> tuple[str, float]:
    """A latency table file (`hand_latency_model`, no measuring) for the quickstart recipe with `overrides`, and a
    budget at which the recipe's own widths predict `scale` x the budget (at least 0.5 ms: a measured tiny network
    stays well under it, so the bake does not trim)."""
    from flexslim.data.sources import load_dataset
    from flexslim.recipe.schema import load_recipe

    recipe = load_recipe("quickstart", overrides)
    arch = Arch.for_data(recipe.model, load_dataset(recipe.data))
    model = hand_latency_model(arch, recipe.latency, ms_per_mmac=0.05, intercept=0.01)
    path = tmp / "table.json"
    model.save(path)
    budget = round(float(model.predict(arch.widths)) / scale, 4)
    return str(path), max(budget, 0.5)


def error_line(result) -> str:
    """The single `error: ...` line a CLI result printed on stderr (progress output may precede it); checks
    there is no traceback."""
    text = result.stderr
    assert "Traceback" not in text and "Traceback" not in result.stdout
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"expected one 'error:' line on stderr, got:\n{text}"
    assert text.rstrip().endswith(lines[0].rstrip()), f"the error line is not the last thing printed:\n{text}"
    return lines[0]


def replace(obj, **changes):
    return dataclasses.replace(obj, **changes)
