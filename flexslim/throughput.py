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


def measure_throughput(
    recipe, input_shape, num_classes: int, device: torch.device, steps: int = 10, warmup: int = 3
) -> dict:
    from flexslim.arch import Arch
    from flexslim.devices import autocast, prepare
    from flexslim.spaces import build_network
    from flexslim.supernet import Supernet, make_masks
    from flexslim.train import make_sgd

    torch.manual_seed(0)
    arch = Arch.from_model(
        recipe.model, input_shape, num_classes, "synthetic", (0.5,) * input_shape[0], (0.25,) * input_shape[0]
    )
    bs = recipe.search.batch_size
    x = torch.rand(bs, *input_shape, device=device)
    y = torch.randint(0, num_classes, (bs,), device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    def weight_step_fn(net, params, xb=x, yb=y):
        opt = make_sgd(params, 0.01, 0.9, 3e-4)

        def step():
            with autocast(device):
                loss = F.cross_entropy(net(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    sn = prepare(Supernet(arch, make_masks(arch, recipe.model, recipe.search)), device).train()
    arch_opt = torch.optim.Adam(sn.arch_parameters(), lr=0.1)
    w_step = weight_step_fn(sn, sn.weight_parameters())

    def search_step():  # Algorithm 1: a weights step and an architecture step
        w_step()
        with autocast(device):
            loss = F.cross_entropy(sn(x).float(), y)
        params = sn.arch_parameters()
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        arch_opt.step()

    t_search = _time_steps(search_step, steps, warmup, device)
    t_masked = _time_steps(w_step, steps, warmup, device)
    dense_alloc = prepare(build_network(arch, sn.allocated()), device).train()
    t_dense_alloc = _time_steps(weight_step_fn(dense_alloc, dense_alloc.parameters()), steps, warmup, device)
    dense = prepare(build_network(arch), device).train()
    bt = recipe.train.batch_size
    x2 = torch.rand(bt, *input_shape, device=device)
    y2 = torch.randint(0, num_classes, (bt,), device=device)

    t_retrain = _time_steps(weight_step_fn(dense, dense.parameters(), x2, y2), steps, warmup, device)
    return {
        "device": str(device),
        "allocated": sn.allocated(),
        "search_images_per_s": 2 * bs / t_search,  # each search step consumes a D_t and a D_s batch
        "retrain_images_per_s": bt / t_retrain,
        "masked_weight_step_s": t_masked,
        "dense_same_widths_step_s": t_dense_alloc,
        "mask_overhead_ratio": t_masked / t_dense_alloc,
    }
