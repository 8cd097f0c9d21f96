"""Step-time benchmark: images/s of the search step and of the retraining step, and the overhead of
the masks (masked supernet vs a dense network at the SAME allocated widths), on the training device."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def _time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def _batch(n: int, input_shape, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and labels (channels-last on CUDA, as the training loops feed them)."""
    x = torch.rand(n, *input_shape, device=device)
    y = torch.randint(0, num_classes, (n,), device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _weight_step(net, params, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """A closure doing one SGD step of `net` on (x, y)."""
    from flexslim.system.devices import autocast
    from flexslim.train.loop import make_sgd

    opt = make_sgd(params, 0.01, 0.9, 3e-4)

    def step():
        with autocast(device):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _search_step(arch, recipe, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """A closure doing Algorithm 1's step as the search runs it (`search.loop.weight_step` on a D_t batch, then
    `search.loop.arch_step` on a D_s batch), on a fresh supernet; the latency term is a MACs-only model (its
    prediction costs the same as a measured one's: a linear map of the same cost terms)."""
    from flexslim.data.augment import Augment
    from flexslim.latency.budget import Budget
    from flexslim.latency.model import LatencyModel
    from flexslim.models.families import cost_terms
    from flexslim.search.loop import SearchLoop, arch_step, build_state, weight_step
    from flexslim.system.console import Reporter

    terms = sorted(cost_terms(arch, arch.widths))
    latency = LatencyModel(
        arch=arch,
        settings=recipe.latency,
        provider="none",
        runtime="macs only (throughput)",
        host="",
        terms=terms,
        coef=[1e-8 if t.startswith("macs") else 0.0 for t in terms],
        intercept=0.01,
        region={s: [1, 1 << 20] for s in arch.widths},
    )
    st = build_state(arch, recipe, device)
    st.supernet.train()
    st.supernet.start_epoch(0, recipe.search.epochs, recipe.search)
    loop = SearchLoop(recipe, Budget(1.0), latency, device, Reporter(), steps_per_epoch=1 << 20)
    augment = Augment(recipe.data, seed=recipe.search.seed)

    def step():
        weight_step(st, loop, augment, x, y)
        arch_step(st, loop, augment, x, y)
        st.step += 1

    return step, st.supernet


def measure_throughput(
    recipe, input_shape, num_classes: int, device: torch.device, steps: int = 10, warmup: int = 3
) -> dict:
    """Time the search step, the masked and dense weight steps, and the retraining step on random data.

    Args:
        recipe: the recipe whose model, search batch and train batch are timed.
        input_shape, num_classes: the data's (C, H, W) and classes.
        device: the training device; steps, warmup: timed and untimed steps per measurement.

    Returns:
        {"device", "allocated", "search_images_per_s", "retrain_images_per_s", "masked_weight_step_s",
        "dense_same_widths_step_s", "mask_overhead_ratio"}.
    """
    from flexslim.models.arch import Arch
    from flexslim.models.families import build_network
    from flexslim.search.supernet import Supernet, make_masks
    from flexslim.system.devices import prepare

    torch.manual_seed(0)
    arch = Arch.from_model(
        recipe.model, input_shape, num_classes, "synthetic", (0.5,) * input_shape[0], (0.25,) * input_shape[0]
    )
    bs, bt = recipe.search.batch_size, recipe.train.batch_size
    x, y = _batch(bs, input_shape, num_classes, device)
    search_step, _ = _search_step(arch, recipe, x, y, device)
    t_search = _time_steps(search_step, steps, warmup, device)
    sn = prepare(Supernet(arch, make_masks(arch, recipe.model, recipe.search)), device).train()
    t_masked = _time_steps(_weight_step(sn, sn.weight_parameters(), x, y, device), steps, warmup, device)
    dense_alloc = prepare(build_network(arch, sn.allocated()), device).train()
    alloc_step = _weight_step(dense_alloc, dense_alloc.parameters(), x, y, device)
    t_dense_alloc = _time_steps(alloc_step, steps, warmup, device)
    dense = prepare(build_network(arch), device).train()
    x2, y2 = _batch(bt, input_shape, num_classes, device)
    t_retrain = _time_steps(_weight_step(dense, dense.parameters(), x2, y2, device), steps, warmup, device)
    return {
        "device": str(device),
        "allocated": sn.allocated(),
        "search_images_per_s": 2 * bs / t_search,  # each search step consumes a D_t and a D_s batch
        "retrain_images_per_s": bt / t_retrain,
        "masked_weight_step_s": t_masked,
        "dense_same_widths_step_s": t_dense_alloc,
        "mask_overhead_ratio": t_masked / t_dense_alloc,
    }
