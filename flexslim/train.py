"""Training and evaluation of the dense network: train_one_epoch / evaluate / fit, and `train_arch`,
which retrains an Arch from scratch and writes `model.pt` ({arch, state_dict, recipe, metrics})."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flexslim.arch import Arch
from flexslim.config import Recipe, TrainConfig, recipe_to_toml
from flexslim.console import Reporter
from flexslim.data import Augment, Batches, Dataset, as_float
from flexslim.devices import autocast, prepare, to_device_batch
from flexslim.errors import BadInput
from flexslim.runs import atomic_torch_save


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lr: float
    seconds: float


def make_sgd(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing stepped once per batch, from the optimiser's lr down to 0 at the last step."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps), eta_min=0.0)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int = 500
) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) on (x, y) without augmentation."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb = to_device_batch(as_float(x[i : i + batch_size]), device)
        yb = y[i : i + batch_size].to(device)
        with autocast(device):
            logits = model(xb)
        loss_sum += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / max(1, len(y)), correct / max(1, len(y))


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    augment: Augment,
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg: TrainConfig,
    device: torch.device,
    reporter: Reporter,
    aux_weight: float = 0.0,
) -> tuple[float, float]:
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for xb, yb in batches:
        xb, yb = augment(to_device_batch(xb, device)), yb.to(device)
        with autocast(device):
            logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            aux = getattr(model, "aux_logits", None)
            if aux_weight and aux is not None:
                loss = loss + aux_weight * F.cross_entropy(aux.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach()) * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(yb)
        reporter.advance(f"loss {float(loss.detach()):.3f}")
    return loss_sum / max(1, seen), correct / max(1, seen)


def fit(
    model: nn.Module,
    ds: Dataset,
    recipe: Recipe,
    device: torch.device,
    epochs: int | None = None,
    reporter: Reporter | None = None,
    checkpoint: Path | None = None,
) -> list[EpochMetrics]:
    """Train from the network's current weights for `epochs` (default: the recipe's), evaluating each epoch.

    With `checkpoint`, the full training state is saved there after every epoch and, if the file exists when
    fit starts, training resumes from it (same schedule, same data order).
    """
    cfg = recipe.train
    epochs = cfg.epochs if epochs is None else epochs
    if epochs < 1:
        raise BadInput(f"epochs must be >= 1, got {epochs}")
    reporter = reporter or Reporter()
    torch.manual_seed(cfg.seed)
    model = prepare(model, device)
    batches = Batches(
        ds.train_x, ds.train_y, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=len(ds.train_y) > cfg.batch_size
    )
    augment = Augment(recipe.data, seed=cfg.seed)
    optimizer = make_sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, epochs * len(batches))
    history: list[EpochMetrics] = []
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batches.generator.set_state(state["batch_rng"])
        augment.set_state(state.get("augment_rng", {}))
        history = [EpochMetrics(**m) for m in state["history"]]
        start = len(history)
        reporter.log(f"resuming training at epoch {start + 1}/{epochs} from {checkpoint}")
    reporter.start("train", (epochs - start) * len(batches))
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        if hasattr(model, "drop_path_prob"):  # DARTS family: drop-path grows linearly to model.drop_path
            model.drop_path_prob = recipe.model.drop_path * epoch / epochs
        tr_loss, tr_acc = train_one_epoch(
            model, batches, augment, optimizer, scheduler, cfg, device, reporter, recipe.model.auxiliary_weight
        )
        te_loss, te_acc = evaluate(model, ds.test_x, ds.test_y, device)
        if not math.isfinite(tr_loss):
            raise BadInput(f"training diverged at epoch {epoch + 1} (loss {tr_loss}); lower train.lr")
        m = EpochMetrics(epoch + 1, tr_loss, tr_acc, te_loss, te_acc, lr, time.perf_counter() - t0)
        history.append(m)
        reporter.log(
            f"epoch {m.epoch:3d}/{epochs}  loss {m.train_loss:.4f}  train acc {m.train_acc:.4f}  "
            f"test acc {m.test_acc:.4f}  lr {m.lr:.4f}  {m.seconds:.1f}s"
        )
        if checkpoint is not None:
            atomic_torch_save(
                checkpoint,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "batch_rng": batches.generator.get_state(),
                    "augment_rng": augment.get_state(),
                    "history": [asdict(h) for h in history],
                },
            )
    reporter.stop()
    return history


def save_model(path: Path, arch: Arch, model: nn.Module, recipe: Recipe, metrics: list[EpochMetrics] | dict) -> Path:
    # the auxiliary head only serves training: the saved network is the plain one
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("auxiliary.")}
    payload = {
        "arch": arch.to_dict(),
        "state_dict": state,
        "recipe": recipe_to_toml(recipe),
        "metrics": [asdict(m) for m in metrics] if isinstance(metrics, list) else metrics,
    }
    return atomic_torch_save(path, payload)


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[Arch, nn.Module, dict]:
    """Rebuild the network from model.pt (weights_only load); returns (arch, eval-mode model, payload)."""
    from flexslim.spaces import build_network

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} does not exist; train the run first (`flexslim train RUN_DIR`)")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        arch = Arch.from_dict(payload["arch"], where=str(path))
        model = build_network(arch)
        model.load_state_dict(payload["state_dict"])
    except BadInput:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign checkpoint
        raise BadInput(
            f"{path} is not a flexslim model.pt ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
        ) from None
    return arch, model.to(device).eval(), payload


def train_arch(
    arch: Arch,
    recipe: Recipe,
    run_dir: Path,
    ds: Dataset,
    device: torch.device,
    epochs: int | None = None,
    reporter: Reporter | None = None,
    resume: bool = False,
) -> list[EpochMetrics]:
    """Retrain `arch` from scratch; writes run_dir/model.pt (and a per-epoch checkpoint for --resume)."""
    from flexslim.spaces import build_network

    torch.manual_seed(recipe.train.seed)
    model = build_network(arch, auxiliary=recipe.model.auxiliary_weight > 0)
    if recipe.model.pretrained:  # a user's backbone: retrain (fine-tune) from it, not from scratch
        from flexslim.pretrained import load_pretrained

        load_pretrained(model, recipe.model.pretrained)
    ckpt = run_dir / "train_state.pt"
    if not resume:
        ckpt.unlink(missing_ok=True)
    history = fit(model, ds.to(device), recipe, device, epochs, reporter, checkpoint=ckpt)
    save_model(run_dir / "model.pt", arch, model, recipe, history)
    ckpt.unlink(missing_ok=True)
    return history


@dataclass(frozen=True)
class TrainRun:
    run_dir: Path
    arch: Arch
    recipe: Recipe
    dataset: Dataset


def open_train_run(
    target: Path | None, recipe_name: str | None, overrides: list[str], data_dir: Path | None
) -> TrainRun:
    """Where `flexslim train` writes and what it trains.

    - a run directory: its arch.json, with its recipe.toml unless `--recipe` is given;
    - an arch.json: a new run directory holding a copy of it;
    - nothing: a new run directory with the recipe's own (initial) widths.
    """
    from flexslim.arch import arch_json, load_arch
    from flexslim.config import load_recipe
    from flexslim.data import load_dataset
    from flexslim.runs import atomic_write_text, mark_latest, new_run_dir

    if target is not None and target.is_dir():
        arch = load_arch(target / "arch.json")
        recipe_src = recipe_name or (
            str(target / "recipe.toml") if (target / "recipe.toml").is_file() else "quickstart"
        )
        recipe = load_recipe(recipe_src, overrides)
        run_dir = target
    else:
        recipe = load_recipe(recipe_name or "quickstart", overrides)
        if target is not None:
            if not target.is_file():
                raise BadInput(f"{target} is neither a run directory nor an arch.json file")
            arch = load_arch(target)
        else:
            arch = None
        run_dir = None
    ds = load_dataset(recipe.data, data_dir)
    if arch is None:
        arch = Arch.from_model(recipe.model, ds.input_shape, ds.num_classes, ds.name, ds.mean, ds.std, ds.class_names)
    if arch.input_shape != ds.input_shape or arch.dataset != ds.name:
        raise BadInput(
            f"the arch is for {arch.dataset} {list(arch.input_shape)} but the recipe's data is {ds.name} "
            f"{list(ds.input_shape)}; pick the matching --recipe"
        )
    if run_dir is None:
        run_dir = new_run_dir(recipe.name)
        atomic_write_text(run_dir / "arch.json", arch_json(arch))
        mark_latest(run_dir)
    atomic_write_text(run_dir / "recipe.toml", recipe_to_toml(recipe))
    return TrainRun(run_dir, arch, recipe, ds)
