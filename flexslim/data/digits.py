"""scikit-learn's bundled 8x8 digits and its stratified 80/20 split, read without importing scikit-learn.

`from sklearn.model_selection import train_test_split` costs ~0.8 s (SciPy and the rest) in every process that
loads the quickstart data - every search, bench worker, sweep run and gate. The digits are one CSV inside the
installed scikit-learn package, and the split is a few lines of NumPy: `split` reproduces
`train_test_split(range(n), test_size=..., random_state=seed, stratify=y)` index for index (scikit-learn's
StratifiedShuffleSplit: the approximate multivariate-hypergeometric mode per class, ties broken by the seeded
RandomState, one permutation per class, then the two index lists permuted). tests/test_data.py checks both
against scikit-learn itself; where the CSV is not found, scikit-learn is imported after all.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np


def csv_path() -> Path | None:
    """The digits CSV inside the installed scikit-learn (found without importing it), or None."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def load() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64 of 0..16, targets (1797,) int64), as `sklearn.datasets.load_digits()`."""
    path = csv_path()
    if path is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target.astype(np.int64)
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per class, how many of `draws` samples it gets: floor of its share, the rest by largest remainder (ties
    drawn at random)."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def split(y: np.ndarray, test_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, test indices) of a stratified shuffle split of range(len(y)), as scikit-learn's
    `train_test_split(list(range(len(y))), test_size=test_size, random_state=seed, stratify=y)`."""
    n = len(y)
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    _, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
    per_class = np.split(np.argsort(y_idx, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, members in enumerate(per_class):
        shuffled = members.take(rng.permutation(counts[i]), mode="clip")
        train.extend(shuffled[: n_i[i]])
        test.extend(shuffled[n_i[i] : n_i[i] + t_i[i]])
    return [int(i) for i in rng.permutation(train)], [int(i) for i in rng.permutation(test)]
