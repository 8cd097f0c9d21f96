"""What a bench row's accuracy cost to compute: images x multiply-accumulates of the search and of the retraining.

A training step on an image costs about three forward passes (forward, and a backward pass of about twice its
cost), so `TRAIN_PASSES` x forward MACs per image and step; a forward MAC count is torch's FlopCounterMode over one
image of the dense network (FLOPs / 2). The supernet is charged at the widths its kernels hold (its masks are
elementwise: their cost is left out), epoch by epoch from search.jsonl: a weight step on D_t every step, an
architecture step on D_s too once the warm-up is over (`arch_ce` > 0 in that epoch's line). Uniform scaling
searches by measuring latency alone (0); random search trains each candidate for `PROXY_EPOCHS` over D_t.

    forward_macs(arch, {"stage1": 16, ...})          # 1.9e6 MACs per image
    search_gmacs(arch, history, batch_size=128)      # summed over the epochs, in 1e9 MACs
    train_gmacs(arch, widths, epochs=6, images=10000)
"""

from __future__ import annotations

import functools
import json

TRAIN_PASSES = 3  # forward + backward ~ 3 forward passes
GIGA = 1e9


def forward_macs(arch, widths: dict[str, int]) -> float:
    """Multiply-accumulates of one forward pass of one image through the dense network at `widths`."""
    return _forward_macs(json.dumps(arch.with_widths(dict(widths)).to_dict(), sort_keys=True))


@functools.lru_cache(maxsize=256)
def _forward_macs(arch_json: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from flexslim.models.arch import Arch
    from flexslim.models.families import build_network

    arch = Arch.from_dict(json.loads(arch_json))
    net = build_network(arch).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.rand(1, *arch.input_shape))
    return counter.get_total_flops() / 2


def train_gmacs(arch, widths: dict[str, int], epochs: float, images: int) -> float:
    """Training the dense network at `widths` for `epochs` passes over `images` images (1e9 MACs)."""
    return TRAIN_PASSES * forward_macs(arch, widths) * epochs * images / GIGA


def search_gmacs(arch, history: list[dict], batch_size: int) -> float:
    """A supernet search from its search.jsonl lines (1e9 MACs): per epoch, `steps` x `batch_size` images through
    the supernet at the widths it held (`allocated_before`), once for the weights and, after the warm-up, once more
    for the architecture."""
    total = 0.0
    for h in history:
        held = h.get("allocated_before") or h.get("allocated")
        images = int(h.get("steps") or 0) * batch_size
        passes = 2 if float(h.get("arch_ce") or 0.0) > 0.0 else 1
        total += passes * TRAIN_PASSES * forward_macs(arch, held) * images
    return total / GIGA


def train_images(ds, recipe) -> int:
    """Images one retraining epoch passes through (whole batches of the training split)."""
    bs = recipe.train.batch_size
    return len(ds.train_batches(bs)) * bs
