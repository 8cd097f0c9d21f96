"""An image-folder dataset made from scikit-learn's digits: PNG files in class folders (torchvision's ImageFolder
layout), 32x32 RGB with a random tint per image. Class folders are named "zero".."nine", so their sorted order
(the class index) is not the digit."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digits_folder(root: Path, train_per_class: int = 40, val_per_class: int = 10, size: int = 32) -> Path:
    """root/train/<name>/NNN.png and root/val/<name>/NNN.png; returns root."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    seen: dict[int, int] = defaultdict(int)
    for image, label in zip(digits.images, digits.target):
        k = seen[label]
        seen[label] += 1
        if k >= train_per_class + val_per_class:
            continue
        grey = Image.fromarray((image * (255 / 16)).astype(np.uint8), "L").resize((size, size), Image.BILINEAR)
        tint = rng.uniform(0.5, 1.0, 3)
        rgb = (np.asarray(grey, dtype=np.float32)[..., None] * tint).astype(np.uint8)
        folder = root / ("train" if k < train_per_class else "val") / NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb, "RGB").save(folder / f"{k:03d}.png")
    return root
