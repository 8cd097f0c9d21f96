"""`synthetic`: CIFAR-shaped random images (3 x image_size x image_size, uint8, 10 classes, random labels).

For timing and memory only: the paper's recipes (cifar10-darts, cifar10-resnet) run their search and retraining
on a machine without CIFAR-10 (`--set data.dataset=synthetic`). The labels carry no information, so every
accuracy measured on it is meaningless (chance, 0.1): the bench shows "n/a (synthetic)", and the dataset's name
("synthetic") travels into arch.json and the ONNX metadata. Seeded by data.split_seed: the same images every run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flexslim.data.tensors import Dataset
from flexslim.recipe.schema import DataConfig

NAME = "synthetic"
TRAIN_SIZE = 5000  # images; a tenth of CIFAR-10's training set: search epochs of 26 steps at batch 96
TEST_SIZE = 1000
CLASSES = 10
CHANNELS = 3
UNIFORM_MEAN, UNIFORM_STD = 0.5, (1 / 12) ** 0.5  # of uniform pixels in [0, 1]


def is_synthetic(name: str) -> bool:
    """True for the dataset whose accuracies mean nothing."""
    return name == NAME


def load_synthetic(cfg: DataConfig, data_dir: str | Path | None = None) -> Dataset:
    """TRAIN_SIZE + TEST_SIZE random uint8 images at cfg.image_size with random labels, seeded by cfg.split_seed."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    side = cfg.image_size

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, CHANNELS, side, side), generator=g, dtype=torch.uint8)

    def labels(n: int) -> torch.Tensor:
        return torch.randint(0, CLASSES, (n,), generator=g, dtype=torch.int64)

    train_x, train_y, test_x, test_y = images(TRAIN_SIZE), labels(TRAIN_SIZE), images(TEST_SIZE), labels(TEST_SIZE)
    return Dataset(
        NAME,
        train_x,
        train_y,
        test_x,
        test_y,
        CLASSES,
        (UNIFORM_MEAN,) * CHANNELS,
        (UNIFORM_STD,) * CHANNELS,
        tuple(f"random{k}" for k in range(CLASSES)),
    )
