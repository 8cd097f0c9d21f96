"""Training and evaluation of the dense network: train_one_epoch / evaluate / fit, and `train_arch`,
which retrains an Arch from scratch and writes `model.pt` ({arch, state_dict, recipe, metrics})."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flexslim.data.augment import Augment
from flexslim.data.tensors import Batches, Dataset, StreamedDataset
from flexslim.errors import BadInput
from flexslim.recipe.schema import Recipe, TrainConfig
from flexslim.system import collectives, distributed
from flexslim.system.console import Reporter
from flexslim.system.devices import autocast, cpu_training_kernels, prepare, to_device_batch
from flexslim.train.checkpoint import EpochMetrics, TrainState, train_identity
from flexslim.train.schedules import cosine_lr, drop_path_at, set_drop_path


def make_sgd(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with momentum and weight decay, the optimizer of the search's weights and of retraining."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int = 500
) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) on (x, y) without augmentation."""
    return evaluate_batches(model, Batches(x, y, batch_size), device)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches, device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) over (x, y) batches (a dataset's `test_batches()`), no augmentation."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for xb, yb in batches:
        xb, yb = to_device_batch(xb, device), yb.to(device)
        with autocast(device):
            logits = model(xb)
        loss_sum += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(yb)
    return loss_sum / max(1, seen), correct / max(1, seen)


@torch.no_grad()
def recalibrate(model: nn.Module, batches, device: torch.device) -> nn.Module:
    """Recompute `model`'s BatchNorm running statistics over `batches` (train mode, a cumulative average, no
    augmentation), in place; returns it in eval mode. A searched supernet's running statistics lag its masks
    (momentum over few steps, channels re-initialised at every re-allocation): evaluated, or sliced into a dense
    network, as they are, the searched weights look worse than they are."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all the batches
    model.train()
    for x, _ in batches:
        with autocast(device):
            model(to_device_batch(x, device))
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    return model.eval()


def train_one_epoch(
    ts: TrainState, cfg: TrainConfig, device: torch.device, reporter: Reporter, aux_weight: float = 0.0
) -> tuple[float, float]:
    """One pass over ts.batches: SGD steps at the cosine lr of each step (grad-norm clipped), plus the
    auxiliary head's loss times `aux_weight` when the model has one. Returns (mean loss, accuracy). Under torchrun
    each rank trains on its shard of every batch, gradients are averaged, and the figures are the global ones."""
    model, optimizer = ts.model, ts.optimizer
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for xb, yb in ts.batches:
        xb, yb = ts.augment(to_device_batch(xb, device)), yb.to(device)
        n = len(yb)
        xb, yb = collectives.shard(xb), collectives.shard(yb)
        with autocast(device):
            logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            aux = getattr(model, "aux_logits", None)
            if aux_weight and aux is not None:
                loss = loss + aux_weight * F.cross_entropy(aux.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        collectives.average_gradients(list(model.parameters()), len(yb), n)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for g in optimizer.param_groups:
            g["lr"] = cosine_lr(cfg.lr, ts.step, ts.total_steps)
        optimizer.step()
        ts.step += 1
        loss_sum += float(loss.detach()) * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(yb)
        reporter.advance(f"loss {float(loss.detach()):.3f}")
    loss_sum, correct, seen = collectives.sum_over_ranks([loss_sum, correct, seen])
    return loss_sum / max(1, seen), correct / max(1, seen)


def fit_epoch(
    ts: TrainState, ds: Dataset | StreamedDataset, recipe: Recipe, device: torch.device, reporter: Reporter, epochs: int
):
    """Train and evaluate the next epoch of `epochs`; appends and returns its EpochMetrics (BadInput if the
    loss diverged)."""
    epoch, t0 = len(ts.history), time.perf_counter()
    lr = cosine_lr(recipe.train.lr, ts.step, ts.total_steps)
    set_drop_path(ts.model, drop_path_at(recipe.model.drop_path, epoch, epochs))
    tr_loss, tr_acc = train_one_epoch(ts, recipe.train, device, reporter, recipe.model.auxiliary_weight)
    collectives.broadcast_module(ts.model)  # rank 0's BN statistics (each rank saw only its shards)
    te_loss, te_acc = evaluate_batches(ts.model, ds.test_batches(), device)
    if not math.isfinite(tr_loss):
        raise BadInput(f"training diverged at epoch {epoch + 1} (loss {tr_loss}); lower train.lr")
    m = EpochMetrics(epoch + 1, tr_loss, tr_acc, te_loss, te_acc, lr, time.perf_counter() - t0)
    ts.history.append(m)
    return m


def fit(
    model: nn.Module,
    ds: Dataset | StreamedDataset,
    recipe: Recipe,
    device: torch.device,
    epochs: int | None = None,
    reporter: Reporter | None = None,
    checkpoint: Path | None = None,
) -> list[EpochMetrics]:
    """Train from the network's current weights for `epochs` (default: the recipe's), evaluating each epoch.

    Args:
        model: the network (moved to `device` in place); ds: train set to fit, test set to evaluate.
        recipe: [train] gives the SGD, cosine lr and batches, [model] the drop-path ramp and auxiliary weight.
        checkpoint: if given, the full training state is saved there after every epoch and, if the file exists
            when fit starts, training resumes from it (same schedule, same data order).

    Returns:
        One EpochMetrics per epoch, the resumed ones included.
    """
    cfg = recipe.train
    epochs = cfg.epochs if epochs is None else epochs
    if epochs < 1:
        raise BadInput(f"epochs must be >= 1, got {epochs}")
    reporter = reporter or Reporter()
    distributed.check_batch(cfg.batch_size, "train.batch_size")
    torch.manual_seed(cfg.seed)
    model = prepare(model, device)
    drop_last = ds.num_train > cfg.batch_size
    batches = ds.train_batches(cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=drop_last)
    optimizer = make_sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    ts = TrainState(model, optimizer, batches, Augment(recipe.data, seed=cfg.seed), epochs * len(batches))
    ts.identity = train_identity(recipe, epochs)
    if checkpoint is not None and distributed.on_main(checkpoint.is_file):
        ts.restore(checkpoint, device)
        reporter.log(f"resuming training at epoch {len(ts.history) + 1}/{epochs} from {checkpoint}")
    reporter.start("train", (epochs - len(ts.history)) * len(batches))
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    while len(ts.history) < epochs:
        with cpu_training_kernels(device, widths):  # oneDNN off on the CPU for nets under 8 channels
            m = fit_epoch(ts, ds, recipe, device, reporter, epochs)
        reporter.log(
            f"epoch {m.epoch:3d}/{epochs}  loss {m.train_loss:.4f}  train acc {m.train_acc:.4f}  "
            f"test acc {m.test_acc:.4f}  lr {m.lr:.4f}  {m.seconds:.1f}s"
        )
        if checkpoint is not None:
            ts.save(checkpoint)
    reporter.stop()
    return ts.history
