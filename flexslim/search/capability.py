"""What a candidate network can do, judged by the searched supernet: its weights sliced to the candidate's widths
(the hard-masked supernet, `Supernet.dense`), BatchNorm recalibrated on D_t, top-1 accuracy on D_s.

The bake ranks the candidates that measure inside the latency window by this score (DESIGN: "among those, the most
accurate - judged by the searched supernet on D_s, not by latency used"); the test set is never looked at.

    score = SupernetScore(supernet, ds, recipe, device)
    score({"stage1": 16, "stage2": 32, "stage3": 64})   # 0.87 (cached per widths)
    score.noise(0.87)                                   # its binomial standard error on the images scored

A candidate wider than the supernet's allocation in a stage is scored with the channels past it at zero
(`Supernet.dense(known_only=True)`): the supernet knows nothing of them, so going past the allocation neither
costs nor earns score (a fill past it at 4 x the fashion floor: 16/48/80/160 and 16/48/80/176 score the same). With
freshly initialised channels there, a score had measured the draw: from the global generator, it depended on how many
networks were built before it (the README job's warm bake scored 16/48/96 0.9708 where its cold bake had scored
0.9722, and timed three new networks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from flexslim.data.tensors import Dataset
from flexslim.recipe.schema import Recipe

MAX_IMAGES = 4096  # D_s images scored (and D_t images for the BatchNorm statistics): ~1 s per candidate on a CPU


@dataclass
class SupernetScore:
    """D_s accuracy of the supernet's weights at given widths (see the module docstring); callable, cached."""

    supernet: torch.nn.Module
    ds: Dataset
    recipe: Recipe
    device: torch.device
    max_images: int = MAX_IMAGES
    cache: dict[tuple, float] = field(default_factory=dict)
    scored_images: int = 0

    def __call__(self, widths: dict[str, int]) -> float:
        """Top-1 accuracy on (up to max_images of) D_s of the supernet sliced to `widths`."""
        key = tuple(sorted(widths.items()))
        if key not in self.cache:
            self.cache[key] = self._score(dict(widths))
        return self.cache[key]

    def noise(self, value: float) -> float:
        """The standard error of an accuracy `value` measured on the scored images (binomial), at least one image."""
        n = max(1, self.scored_images)
        return max(math.sqrt(max(value * (1.0 - value), 0.0) / n), 1.0 / n)

    def _score(self, widths: dict[str, int]) -> float:
        from flexslim.train.loop import evaluate_batches, recalibrate

        d_t, d_s = self.ds.search_halves(self.recipe.data.split_seed)
        bs = self.recipe.search.batch_size
        with torch.random.fork_rng(devices=[]):  # scoring leaves the global generator as it was
            _, dense = self.supernet.dense(widths, known_only=True)  # channels past the allocation: zero
        dense = dense.to(self.device)
        recalibrate(dense, _first(d_t.train_batches(bs), self.max_images), self.device)
        batches = list(_first(d_s.train_batches(bs), self.max_images))
        self.scored_images = sum(len(y) for _, y in batches)
        return evaluate_batches(dense, batches, self.device)[1]


def _first(batches, max_images: int):
    """The batches of an (unshuffled) batch stream up to about `max_images` images."""
    seen = 0
    for x, y in batches:
        if seen >= max_images:
            return
        seen += len(y)
        yield x, y
