"""Algorithm 1 of FlexCHarts (first order), the budget controller and the per-epoch history.

Each step: a weights step (SGD) on a D_t batch, then an architecture step (Adam on mu) on a D_s batch
with loss = CE + multiplier * E[latency] / target. The multiplier is the budget controller: dual ascent
on E[latency] / target - 1, treating the budget as an equality (a wider network is almost always more
accurate, so an unused millisecond is lost accuracy): over the target the multiplier grows and pushes the
widths down; under it, it falls below zero and pulls them up. `--latency-ms` is the only knob. At each epoch end the
channels are re-allocated: every stage's kernels follow ceil(mu + k sigma), growing at once and shrinking
only past a hysteresis band; weights, BN statistics and SGD momentum are transplanted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from flexslim.arch import Arch
from flexslim.config import Recipe
from flexslim.console import Reporter
from flexslim.data import Augment, Batches, Dataset, search_split
from flexslim.devices import autocast, prepare, to_device_batch
from flexslim.errors import BadInput
from flexslim.latency import LatencyModel, extend
from flexslim.masks import GaussianMask
from flexslim.runs import append_jsonl, atomic_torch_save
from flexslim.supernet import Supernet, make_masks
from flexslim.train import make_sgd
from flexslim.transplant import transplant_optimizer


@dataclass
class SearchState:
    """Everything the loop carries from one epoch to the next (and what --resume restores)."""

    supernet: Supernet
    w_opt: torch.optim.Optimizer
    a_opt: torch.optim.Optimizer
    multiplier: float
    epoch: int = 0  # epochs finished
    step: int = 0  # weight steps finished
    history: list[dict] = field(default_factory=list)


def cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def next_allocation(sn: Supernet, k_sigma: float, hysteresis: float) -> dict[str, int]:
    """Grow to ceil(mu + k sigma) at once; shrink to it only when the excess passes hysteresis * sigma.
    Masks over a fixed range (DMaskingNAS) keep their allocation."""
    out = {}
    for name, m in sn.masks.items():
        if not isinstance(m, GaussianMask):
            out[name] = m.allocated
            continue
        target = m.target_allocation(k_sigma)
        if target > m.allocated or m.allocated - target > hysteresis * m.sigma:
            out[name] = target
        else:
            out[name] = m.allocated
    return out


def build_state(arch: Arch, recipe: Recipe, device: torch.device) -> SearchState:
    cfg = recipe.search
    torch.manual_seed(cfg.seed)
    sn = Supernet(arch, make_masks(arch, recipe.model, cfg))
    if recipe.model.pretrained:
        from flexslim.pretrained import load_pretrained

        load_pretrained(sn.body, recipe.model.pretrained)
    sn = prepare(sn, device)
    w_opt = make_sgd(sn.weight_parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    arch_lr = cfg.arch_lr if cfg.method == "flexcharts" else cfg.dmask_lr
    a_opt = torch.optim.Adam(sn.arch_parameters(), lr=arch_lr, betas=(cfg.arch_beta1, cfg.arch_beta2), weight_decay=0.0)
    return SearchState(sn, w_opt, a_opt, cfg.init_multiplier)


def save_state(path: Path, st: SearchState) -> None:
    atomic_torch_save(
        path,
        {
            "epoch": st.epoch,
            "step": st.step,
            "multiplier": st.multiplier,
            "history": st.history,
            "allocated": st.supernet.allocated(),
            "masks": st.supernet.masks.state_dict(),
            "body": st.supernet.body.state_dict(),
            "w_opt": st.w_opt.state_dict(),
            "a_opt": st.a_opt.state_dict(),
            "rng": torch.get_rng_state(),
        },
    )


def load_state(path: Path, arch: Arch, recipe: Recipe, device: torch.device) -> SearchState:
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        st = build_state(arch, recipe, device)
        st.supernet.reallocate(d["allocated"])
        st.supernet.masks.load_state_dict(d["masks"])
        st.supernet.body.load_state_dict(d["body"])
        prepare(st.supernet, device)
        cfg = recipe.search
        st.w_opt = make_sgd(st.supernet.weight_parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
        st.w_opt.load_state_dict(d["w_opt"])
        st.a_opt.load_state_dict(d["a_opt"])
        torch.set_rng_state(d["rng"])
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise BadInput(f"cannot resume from {path} ({type(err).__name__}); start a new run without --resume") from None
    st.epoch, st.step, st.multiplier, st.history = d["epoch"], d["step"], d["multiplier"], list(d["history"])
    return st


def run_search(
    arch: Arch,
    recipe: Recipe,
    ds: Dataset,
    budget_ms: float,
    latency: LatencyModel,
    device: torch.device,
    run_dir: Path | None = None,
    reporter: Reporter | None = None,
    resume: bool = False,
) -> SearchState:
    """Search per-stage widths for `budget_ms`; writes search.jsonl (+ search_state.pt for --resume) to run_dir."""
    cfg = recipe.search
    reporter = reporter or Reporter()
    target = budget_ms * (1.0 - cfg.budget_margin)
    ckpt = run_dir / "search_state.pt" if run_dir else None
    st = (
        load_state(ckpt, arch, recipe, device)
        if (resume and ckpt and ckpt.is_file())
        else build_state(arch, recipe, device)
    )
    if resume and st.epoch:
        reporter.log(f"resuming search after epoch {st.epoch}/{cfg.epochs}")
    (dt_x, dt_y), (ds_x, ds_y) = search_split(ds, recipe.data.split_seed)
    bt = Batches(dt_x, dt_y, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True)
    bs = Batches(ds_x, ds_y, cfg.batch_size, shuffle=True, seed=cfg.seed + 1, drop_last=True)
    steps_per_epoch = min(len(bt), len(bs))
    if steps_per_epoch == 0:
        raise BadInput(f"search.batch_size {cfg.batch_size} is larger than half the training set ({len(dt_y)})")
    for _ in range(st.epoch):  # replay the shuffles of finished epochs so a resumed run sees the same batches
        torch.randperm(len(dt_y), generator=bt.generator), torch.randperm(len(ds_y), generator=bs.generator)
    total = cfg.epochs * steps_per_epoch
    sn = st.supernet

    for epoch in range(st.epoch, cfg.epochs):
        t0 = time.perf_counter()
        augment = Augment(recipe.data, seed=cfg.seed * 1000 + epoch)  # one stream per epoch: resumed runs match
        sn.train()
        for m in sn.masks.values():
            if hasattr(m, "tau"):  # DMaskingNAS: anneal the Gumbel-softmax temperature per epoch
                m.tau = cfg.tau0 * cfg.tau_decay**epoch
        if hasattr(sn.body, "drop_path_prob"):  # DARTS family: drop-path grows linearly over the search
            sn.body.drop_path_prob = recipe.model.drop_path * epoch / cfg.epochs
        reporter.start(f"search {epoch + 1}/{cfg.epochs}", steps_per_epoch)
        sums = {"w_loss": 0.0, "a_ce": 0.0, "lat": 0.0}
        for (xt, yt), (xs, ys) in zip(bt, bs):
            lr = cosine_lr(cfg.lr, st.step, total)
            for g in st.w_opt.param_groups:
                g["lr"] = lr
            # weights step on a D_t batch
            xt, yt = augment(to_device_batch(xt, device)), yt.to(device)
            with autocast(device):
                w_loss = F.cross_entropy(sn(xt).float(), yt)
            st.w_opt.zero_grad(set_to_none=True)
            w_loss.backward()
            torch.nn.utils.clip_grad_norm_(sn.weight_parameters(), cfg.grad_clip)
            st.w_opt.step()
            # architecture step on a D_s batch: CE + multiplier * E[latency] / target
            xs, ys = augment(to_device_batch(xs, device)), ys.to(device)
            with autocast(device):
                a_ce = F.cross_entropy(sn(xs).float(), ys)
            lat = latency.predict(sn.expected_widths())
            a_loss = a_ce + st.multiplier * lat / target
            params = sn.arch_parameters()
            for p, g in zip(params, torch.autograd.grad(a_loss, params)):
                p.grad = g
            st.a_opt.step()
            with torch.no_grad():  # options start at min_width: a mean far below it would only slow the way back
                for m in sn.masks.values():
                    if isinstance(m, GaussianMask):
                        m.mu.clamp_(min=float(m.min_width))
            lat_ms = float(lat.detach())
            st.multiplier += cfg.dual_lr * (lat_ms / target - 1.0)
            st.step += 1
            sums["w_loss"] += float(w_loss.detach())
            sums["a_ce"] += float(a_ce.detach())
            sums["lat"] += lat_ms
            reporter.advance(
                f"loss {float(w_loss.detach()):.3f}  E[lat] {lat_ms:.4f}/{budget_ms:g} ms  "
                f"mult {st.multiplier:.2f}  E[w] "
                + " ".join(f"{float(m.expected_width().detach()):.0f}" for m in sn.masks.values())
            )
        reporter.stop()
        step_seconds = time.perf_counter() - t0

        # end of epoch: dynamic channel allocation
        t1 = time.perf_counter()
        before = sn.allocated()
        after = next_allocation(sn, cfg.k_sigma, cfg.hysteresis)
        if after != before:
            old_body, old_opt = sn.reallocate(after), st.w_opt
            st.w_opt = make_sgd(sn.weight_parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
            transplant_optimizer(old_opt, old_body, st.w_opt, sn.body)
            del old_body, old_opt
        realloc_seconds = time.perf_counter() - t1
        t2 = time.perf_counter()
        extended = extend(latency, after, recipe.model.round_to, cfg.extend_samples, reporter=reporter)
        extend_seconds = time.perf_counter() - t2
        with torch.no_grad():
            expected = {k: float(v) for k, v in sn.expected_widths().items()}
            e_lat = float(latency.predict(expected))
        st.epoch = epoch + 1
        line = {
            "epoch": st.epoch,
            "mu": {
                k: float(m.mu.detach()) if hasattr(m, "mu") else float(m.expected_width().detach())
                for k, m in sn.masks.items()
            },
            "sigma": {k: getattr(m, "sigma", None) for k, m in sn.masks.items()},
            "allocated_before": before,
            "allocated": after,
            "expected_widths": expected,
            "final_widths": sn.final_widths(),
            "expected_latency_ms": e_lat,
            "budget_ms": budget_ms,
            "target_ms": target,
            "multiplier": st.multiplier,
            "weight_loss": sums["w_loss"] / steps_per_epoch,
            "arch_ce": sums["a_ce"] / steps_per_epoch,
            "mean_step_latency_ms": sums["lat"] / steps_per_epoch,
            "lr": cosine_lr(cfg.lr, st.step, total),
            "steps": steps_per_epoch,
            "seconds": time.perf_counter() - t0,
            "step_seconds": step_seconds,
            "realloc_seconds": realloc_seconds,
            "latency_extended": extended,
            "extend_seconds": extend_seconds,
        }
        st.history.append(line)
        reporter.log(
            f"epoch {st.epoch:3d}/{cfg.epochs}  loss {line['weight_loss']:.3f}  E[lat] {e_lat:.4f} ms "
            f"(target {target:.4f})  mult {st.multiplier:.2f}  widths {line['final_widths']}  alloc {after}"
            + ("  [latency model extended]" if extended else "")
        )
        if run_dir is not None:
            append_jsonl(run_dir / "search.jsonl", line)
            save_state(ckpt, st)
    return st
