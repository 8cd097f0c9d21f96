"""The one table of each named choice a recipe or flag may take: datasets, families, search methods, bench
methods, providers.

Plain data (names, and `module:function` strings resolved lazily by the layer that implements them), so the recipe
checks and the CLI read the names without importing torch, and every higher layer reads the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

DATASETS: dict[str, str] = {
    "quickstart": "flexslim.data.sources:load_quickstart",
    "cifar10": "flexslim.data.sources:load_cifar10",
    "fashion-mnist": "flexslim.data.sources:load_idx",
    "mnist": "flexslim.data.sources:load_idx",
    "kmnist": "flexslim.data.sources:load_idx",
    "folder": "flexslim.data.folders:load_folder",
    "synthetic": "flexslim.data.synthetic:load_synthetic",
}  # the one dataset table: name -> `loader(cfg: DataConfig, data_dir)`, resolved by flexslim.data.sources
DATASET_CHANNELS = {
    "quickstart": 1,
    "cifar10": 3,
    "fashion-mnist": 1,
    "mnist": 1,
    "kmnist": 1,
    "folder": 3,
    "synthetic": 3,
}  # folder: 3 at most (data.channels: 1 or 3)

PROVIDERS = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "int8", "fp16")  # latency.precision: the graph that is deployed, timed and gated
# int8 formats of onnxruntime's static quantization: QOperator (QLinearConv, uint8 activations, int8 weights) and
# QDQ (Quantize/DequantizeLinear pairs around float operators, int8 or uint8 activations; int8 weights)
INT8_FORMATS = ("qoperator-u8s8", "qdq-s8s8", "qdq-u8s8")

BAKE_RANKS = ("supernet", "latency")  # search.bake_rank: what decides among networks inside the latency window
TRAIN_INITS = ("auto", "scratch", "searched")  # train.init: auto = searched where the run has them, else scratch

SEARCH_METHODS: dict[str, str] = {
    "flexcharts": "flexslim.search.masks:gaussian_masks",
    "dmask": "flexslim.search.masks:gumbel_masks",
}


@dataclass(frozen=True)
class BenchMethod:
    """One row of the bench: `search` is a SEARCH_METHODS name, or None for a `baseline` without a supernet
    (uniform: one width multiplier; random: random search inside the budget; ceiling: the best of
    `bench.ceiling_networks` random networks inside the window, every one retrained - what the budget allows;
    prune: the family trained at `bench.prune_start` x its widths, pruned to the budget, fine-tuned)."""

    name: str
    search: str | None
    overrides: tuple[str, ...] = ()
    baseline: str | None = None


BENCH_METHODS: dict[str, BenchMethod] = {
    m.name: m
    for m in (
        BenchMethod("flexcharts", "flexcharts"),
        BenchMethod("dmask-small", "dmask", ("search.dmask_range=small",)),
        BenchMethod("dmask-large", "dmask", ("search.dmask_range=large",)),
        BenchMethod("uniform", None, baseline="uniform"),
        BenchMethod("random", None, baseline="random"),
        BenchMethod("ceiling", None, baseline="ceiling"),
        BenchMethod("prune", None, baseline="prune"),
    )
}

FAMILIES: dict[str, str] = {
    "resnet": "flexslim.models.spaces.resnet",
    "darts": "flexslim.models.spaces.darts",
    "resnet18": "flexslim.models.spaces.torchvision_resnet",
    "resnet50": "flexslim.models.spaces.torchvision_resnet",
    "mobilenet_v2": "flexslim.models.spaces.torchvision_mobilenet",
}
