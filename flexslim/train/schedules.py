"""Schedules shared by the search and retraining: the per-step cosine learning rate and the drop-path ramp."""

from __future__ import annotations

import math


def cosine_lr(base: float, step: int, total: int) -> float:
    """Learning rate at `step` of `total`: cosine from `base` down to 0, held at 0 past the end."""
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def drop_path_at(final: float, epoch: int, epochs: int) -> float:
    """Drop-path probability in `epoch` (0-based): linear from 0 to `final` over `epochs` (DARTS)."""
    return final * epoch / max(1, epochs)


def set_drop_path(net, p: float) -> None:
    """Set a family network's drop-path probability; families without drop path (resnet) ignore it.

    The one place that asks whether a network has drop path (DARTS nets carry `drop_path_prob`).
    """
    if hasattr(net, "drop_path_prob"):
        net.drop_path_prob = p
