"""The synthetic dataset: CIFAR-shaped random images, seeded, labelled "synthetic", accuracy shown as n/a."""

from __future__ import annotations

import torch

from flexslim.data.sources import load_dataset
from flexslim.data.synthetic import TEST_SIZE, TRAIN_SIZE, is_synthetic
from flexslim.recipe.choices import DATASETS
from flexslim.recipe.schema import DataConfig, load_recipe


def test_cifar_shaped_seeded_and_named():
    a = load_dataset(DataConfig(dataset="synthetic"))
    b = load_dataset(DataConfig(dataset="synthetic"))
    c = load_dataset(DataConfig(dataset="synthetic", split_seed=1))
    assert "synthetic" in DATASETS and a.name == "synthetic" and is_synthetic(a.name)
    assert a.train_x.shape == (TRAIN_SIZE, 3, 32, 32) and a.test_x.shape == (TEST_SIZE, 3, 32, 32)
    assert a.train_x.dtype == torch.uint8 and a.num_classes == 10 and len(a.mean) == len(a.std) == 3
    assert set(a.train_y.unique().tolist()) == set(range(10))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert load_dataset(DataConfig(dataset="synthetic", image_size=16)).input_shape == (3, 16, 16)


def test_the_papers_recipes_take_it_through_set():
    from flexslim.models.arch import Arch

    for name in ("cifar10-darts", "cifar10-resnet"):
        r = load_recipe(name, ["data.dataset=synthetic"])
        ds = load_dataset(r.data)
        arch = Arch.for_data(r.model, ds)
        assert arch.dataset == "synthetic" and arch.input_shape == (3, 32, 32)


def test_bench_table_says_accuracy_is_meaningless(tmp_path):
    from flexslim.bench.report import write_outputs

    row = {
        "method": "flexcharts",
        "seed": None,
        "dataset": "synthetic",
        "widths": {"a": 8},
        "measured_ms": 0.2,
        "predicted_ms": 0.21,
        "budget_ms": 0.3,
        "budget_met": True,
        "search_seconds": 3.0,
        "peak_mb": 100.0,
        "acc_supernet": 0.11,
        "acc_retrained": None,
        "device": "cpu",
    }
    write_outputs([row, {**row, "method": "uniform", "acc_supernet": None}], tmp_path, 0.3, "cifar10-darts")
    text = (tmp_path / "bench.md").read_text()
    assert "n/a (synthetic)" in text and "0.1100" not in text
    assert "Dataset synthetic (random images: accuracy is meaningless)" in text
    assert "Accuracy vs uniform: n/a (synthetic" in text
