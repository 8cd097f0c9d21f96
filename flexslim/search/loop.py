"""Algorithm 1 of FlexCHarts (first order), the budget controller and the per-epoch history.

Each step: a weights step (SGD) on a D_t batch, then an architecture step (Adam on mu) on a D_s batch
with loss = CE + multiplier * E[latency] / target. The multiplier is the budget controller: dual ascent
on E[latency] / target - 1, treating the budget as an equality (a wider network is almost always more
accurate, so an unused millisecond is lost accuracy): over the target the multiplier grows and pushes the
widths down; under it, it falls below zero and pulls them up. `--latency-ms` is the only knob. At each epoch end the
channels are re-allocated: every stage's kernels follow ceil(mu + k sigma), growing at once and shrinking
only past a hysteresis band; weights, BN statistics and SGD momentum are transplanted. The search state and its
checkpoint (search_state.pt) live in `flexslim.search.state`, re-exported here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flexslim.data.augment import Augment
from flexslim.data.tensors import Batches, Dataset
from flexslim.errors import BadInput
from flexslim.latency.budget import Budget
from flexslim.latency.model import LatencyModel, with_grid
from flexslim.models.arch import Arch
from flexslim.models.transplant import transplant_optimizer
from flexslim.recipe.schema import Recipe, SearchConfig
from flexslim.search.state import (
    SearchState,
    _check_identity,
    build_state,
    checkpoint_identity,
    load_state,
    save_state,
    weight_sgd,
)
from flexslim.search.supernet import Supernet
from flexslim.system import collectives, distributed
from flexslim.system.console import Reporter
from flexslim.system.devices import autocast, cpu_training_kernels, to_device_batch
from flexslim.system.files import append_jsonl
from flexslim.train.schedules import cosine_lr, drop_path_at

__all__ = [  # the state and its checkpoint live in search.state; re-exported here
    "SearchState",
    "_check_identity",
    "build_state",
    "checkpoint_identity",
    "load_state",
    "save_state",
    "weight_sgd",
]


@dataclass(frozen=True)
class SearchLoop:
    """What every step of one search reads and never changes: settings, budget, latency model, device."""

    recipe: Recipe
    budget: Budget
    latency: LatencyModel
    device: torch.device
    reporter: Reporter
    steps_per_epoch: int

    @property
    def cfg(self) -> SearchConfig:
        return self.recipe.search

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    @property
    def average_from(self) -> int:
        """The first step whose mean widths enter the average the bake reads."""
        return self.total_steps - max(1, math.ceil(self.cfg.average_last * self.total_steps))


def training_widths(arch: Arch, st: SearchState) -> list[int]:
    """Every channel count the supernet trains at now: stem, head, the stages' widths and their allocation."""
    return [arch.stem_width, arch.head_width, *arch.widths.values(), *st.supernet.allocated().values()]


def search_batches(ds: Dataset, recipe: Recipe, epochs_done: int) -> tuple[Batches, Batches]:
    """The D_t and D_s batch streams, fast-forwarded past `epochs_done` epochs (a resumed run sees the same
    batches); BadInput if a batch is larger than a half of the training set."""
    cfg = recipe.search
    distributed.check_batch(cfg.batch_size, "search.batch_size")
    d_t, d_s = ds.search_halves(recipe.data.split_seed)
    bt = d_t.train_batches(cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True)
    bs = d_s.train_batches(cfg.batch_size, shuffle=True, seed=cfg.seed + 1, drop_last=True)
    if min(len(bt), len(bs)) == 0:
        raise BadInput(f"search.batch_size {cfg.batch_size} is larger than half the training set ({d_t.num_train})")
    bt.skip_epochs(epochs_done), bs.skip_epochs(epochs_done)  # replay the shuffles of finished epochs
    return bt, bs


def weight_step(st: SearchState, loop: SearchLoop, augment: Augment, x: torch.Tensor, y: torch.Tensor) -> float:
    """One SGD step on a D_t batch at the cosine lr of st.step (grad-norm clipped); returns the CE loss. Under
    torchrun each rank trains on its shard of the (global) batch and the gradients are averaged."""
    sn, cfg = st.supernet, loop.cfg
    for g in st.w_opt.param_groups:
        g["lr"] = cosine_lr(cfg.lr, st.step, loop.total_steps)
    x, y = augment(to_device_batch(x, loop.device)), y.to(loop.device)
    n = len(y)
    x, y = collectives.shard(x), collectives.shard(y)
    with autocast(loop.device):
        loss = F.cross_entropy(sn(x).float(), y)
    st.w_opt.zero_grad(set_to_none=True)
    loss.backward()
    (loss_mean,) = collectives.average_gradients(sn.weight_parameters(), len(y), n, [float(loss.detach())])
    torch.nn.utils.clip_grad_norm_(sn.weight_parameters(), cfg.grad_clip)
    st.w_opt.step()
    return loss_mean


def arch_step(
    st: SearchState, loop: SearchLoop, augment: Augment, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    """One Adam step of the masks on a D_s batch with loss = CE + multiplier * E[latency] / target, then the
    masks' projection; returns (CE, E[latency] in ms)."""
    sn = st.supernet
    x, y = augment(to_device_batch(x, loop.device)), y.to(loop.device)
    n = len(y)
    x, y = collectives.shard(x), collectives.shard(y)
    with autocast(loop.device):
        ce = F.cross_entropy(sn(x).float(), y)
    lat = loop.latency.predict_expected(sn.width_distributions())
    loss = ce + st.multiplier * lat / loop.budget.limit_ms
    params = sn.arch_parameters()
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        p.grad = g
    (ce_mean,) = collectives.average_gradients(params, len(y), n, [float(ce.detach())])  # same mu on every rank
    st.a_opt.step()
    sn.project()
    return ce_mean, float(lat.detach())


def warmup_epochs(cfg: SearchConfig) -> int:
    """The first search epochs that train the weights alone (`search.warmup` x epochs, rounded down, and at least one
    when warmup > 0 and the search has two or more epochs): mu, the option logits and the budget controller wait until
    the weights can tell which widths matter (FBNetV2's warm-up). Without it the latency term moves mu from the first
    step on untrained weights, and the early, high-resolution stages - the dearest per channel - collapse to min_width
    before cross-entropy can defend them. (Rounded down alone, 0.25 of a 3-epoch search was no warm-up at all: the
    README's 3 + 12 Fashion-MNIST split searched from the first step.)"""
    n = int(cfg.warmup * cfg.epochs)
    return max(n, 1) if cfg.warmup > 0 and cfg.epochs >= 2 else n


def train_epoch(st: SearchState, loop: SearchLoop, bt: Batches, bs: Batches, epoch: int) -> dict[str, float]:
    """Search epoch `epoch` (0-based) up to, not including, re-allocation: per-epoch updates, then a weights
    step, an architecture step and a controller update per batch pair (a warm-up epoch: the weights step
    alone, E[latency] only read). Returns the epoch's mean losses."""
    cfg, sn = loop.cfg, st.supernet
    warm = epoch < warmup_epochs(cfg)
    augment = Augment(loop.recipe.data, seed=cfg.seed * 1000 + epoch)  # one stream per epoch: resumed runs match
    sn.train()
    sn.start_epoch(epoch, cfg.epochs, cfg)
    sn.set_drop_path(drop_path_at(loop.recipe.model.drop_path, epoch, cfg.epochs))
    loop.reporter.start(f"search {epoch + 1}/{cfg.epochs}", loop.steps_per_epoch)
    sums = {"weight_loss": 0.0, "arch_ce": 0.0, "mean_step_latency_ms": 0.0}
    for (xt, yt), (xs, ys) in zip(bt, bs):
        w_loss = weight_step(st, loop, augment, xt, yt)
        if warm:
            a_ce, lat_ms = 0.0, _expected_latency(sn, loop)
        else:
            a_ce, lat_ms = arch_step(st, loop, augment, xs, ys)
            st.multiplier += cfg.dual_lr * (lat_ms / loop.budget.limit_ms - 1.0)  # dual ascent
            if cfg.clamp_multiplier:  # E[lat] <= limit is an inequality: its multiplier is never a reward
                st.multiplier = max(0.0, st.multiplier)
        if st.step >= loop.average_from:
            for k, v in sn.mean_widths().items():
                st.mu_sum[k] = st.mu_sum.get(k, 0.0) + v
            st.mu_steps += 1
        st.step += 1
        for key, v in zip(sums, (w_loss, a_ce, lat_ms)):
            sums[key] += v
        loop.reporter.advance(
            f"loss {w_loss:.3f}  E[lat] {lat_ms:.4f}/{loop.budget.ms:g} ms  mult {st.multiplier:.2f}  E[w] "
            + " ".join(f"{float(w.detach()):.0f}" for w in sn.expected_widths().values())
        )
    loop.reporter.stop()
    return {key: v / loop.steps_per_epoch for key, v in sums.items()}


def _expected_latency(sn: Supernet, loop: SearchLoop) -> float:
    with torch.no_grad():
        return float(loop.latency.predict_expected(sn.width_distributions()))


def reallocate(st: SearchState, cfg: SearchConfig) -> tuple[dict[str, int], dict[str, int]]:
    """End of epoch: dynamic channel allocation. Rebuilds the body (and the SGD, momentum transplanted) where
    the masks ask for other widths; returns (allocation before, allocation after)."""
    sn = st.supernet
    before = sn.allocated()
    after = sn.next_allocation(cfg.k_sigma, cfg.hysteresis)
    if after != before:
        old_body, old_opt = sn.reallocate(after), st.w_opt
        st.w_opt = weight_sgd(sn, cfg)
        transplant_optimizer(old_opt, old_body, st.w_opt, sn.body)
    return before, after


def epoch_record(st: SearchState, loop: SearchLoop, alloc: tuple[dict, dict], means: dict[str, float]) -> dict:
    """The search.jsonl line of the epoch just finished (st.epoch), without the timings: the masks (Mask.record),
    allocation (before, after), expected and final widths, expected latency vs budget, controller, mean losses
    (from `train_epoch`), lr."""
    sn = st.supernet
    with torch.no_grad():
        expected = {k: float(v) for k, v in sn.expected_widths().items()}
        e_lat = float(loop.latency.predict_expected(sn.width_distributions()))
    return {
        "epoch": st.epoch,
        **sn.records(),
        "mu_avg": st.averaged_widths(),
        "allocated_before": alloc[0],
        "allocated": alloc[1],
        "expected_widths": expected,
        "final_widths": sn.final_widths(),
        "expected_latency_ms": e_lat,
        "budget_ms": loop.budget.ms,
        "target_ms": loop.budget.limit_ms,
        "multiplier": st.multiplier,
        "weight_loss": means["weight_loss"],
        "arch_ce": means["arch_ce"],
        "mean_step_latency_ms": means["mean_step_latency_ms"],
        "lr": cosine_lr(loop.cfg.lr, st.step, loop.total_steps),
        "steps": loop.steps_per_epoch,
        "warmup": st.epoch <= warmup_epochs(loop.cfg),  # weights only: mu and the multiplier did not move
    }


def search_epoch(st: SearchState, loop: SearchLoop, bt: Batches, bs: Batches, epoch: int) -> dict:
    """Search epoch `epoch` in full (train, re-allocate, record); returns the record, also appended to
    st.history. Nothing is measured here: the latency model is fixed for the whole search (deterministic)."""
    t0 = time.perf_counter()
    means = train_epoch(st, loop, bt, bs, epoch)
    t1 = time.perf_counter()
    distributed.check_same("mu and multiplier", ([p.detach() for p in st.supernet.arch_parameters()], st.multiplier))
    alloc = reallocate(st, loop.cfg)
    distributed.check_same("the channel allocation", alloc[1])
    collectives.broadcast_module(st.supernet.body)  # rank 0's BN statistics (each rank saw only its shards)
    t2 = time.perf_counter()
    st.epoch = epoch + 1
    line = epoch_record(st, loop, alloc, means) | {
        "seconds": time.perf_counter() - t0,
        "step_seconds": t1 - t0,
        "realloc_seconds": t2 - t1,
    }
    st.history.append(line)
    return line


def epoch_summary(line: dict, epochs: int) -> str:
    """The one log line of a finished search epoch."""
    return (
        f"epoch {line['epoch']:3d}/{epochs}  loss {line['weight_loss']:.3f}  E[lat] {line['expected_latency_ms']:.4f}"
        f" ms (target {line['target_ms']:.4f})  mult {line['multiplier']:.2f}  widths {line['final_widths']}  "
        f"alloc {line['allocated']}"
    )


@dataclass(frozen=True)
class SearchFolder:
    """Where a search keeps its per-epoch record (search.jsonl) and checkpoint (search_state.pt), and whether it
    continues from that checkpoint (`resume`: the same trajectory, bit for bit on CPU)."""

    path: Path
    resume: bool = False


def run_search(
    arch: Arch,
    recipe: Recipe,
    ds: Dataset,
    *,
    budget: Budget,
    latency: LatencyModel,
    device: torch.device,
    folder: SearchFolder | None = None,
    reporter: Reporter | None = None,
) -> SearchState:
    """Search the per-stage widths of `arch` that fit `budget` (Algorithm 1 with dynamic channel allocation).

    Args:
        arch: the starting network (family, stages at the recipe's widths, data shape).
        recipe: [search] drives the loop, [model] the masks and drop path, [data] the split and augmentation.
        ds: the dataset; only its training set is used (split into D_t for weights and D_s for the masks).
        budget: the latency budget; the controller steers E[latency] to budget.limit_ms.
        latency: the latency model E[latency] is predicted with (read only: the search measures nothing).
        device: the training device.
        folder: if given, each epoch appends its record to folder.path/search.jsonl and saves search_state.pt;
            with `folder.resume` the search continues from that checkpoint when it exists.
        reporter: progress and log output (default: a silent Reporter).

    Returns:
        The final SearchState: `state.supernet.final_widths()` / `to_arch()` are the result,
        `state.history` the per-epoch records.
    """
    identity = checkpoint_identity(arch, recipe, latency)  # the recipe as given: the grid follows from the table
    recipe = with_grid(recipe, latency)  # model.round_to = 0: the runtime's channel block
    cfg, reporter = recipe.search, reporter or Reporter()
    run_dir, resume = (folder.path, folder.resume) if folder else (None, False)
    ckpt = run_dir / "search_state.pt" if run_dir else None
    resuming = bool(resume and ckpt and distributed.on_main(ckpt.is_file))
    st = load_state(ckpt, arch, recipe, device, identity) if resuming else build_state(arch, recipe, device)
    if resume and st.epoch:
        reporter.log(f"resuming search after epoch {st.epoch}/{cfg.epochs}")
    bt, bs = search_batches(ds, recipe, st.epoch)
    loop = SearchLoop(recipe, budget, latency, device, reporter, min(len(bt), len(bs)))
    for epoch in range(st.epoch, cfg.epochs):
        with cpu_training_kernels(device, training_widths(arch, st)):  # oneDNN off for nets under 8 channels
            line = search_epoch(st, loop, bt, bs, epoch)
        if run_dir is not None:  # the checkpoint first: search.jsonl is rewritten whole from it at the end
            save_state(ckpt, st, identity)
            append_jsonl(run_dir / "search.jsonl", line)
        reporter.log(epoch_summary(line, cfg.epochs))
    return st
