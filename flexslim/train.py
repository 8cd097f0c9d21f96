"""Training and evaluation of the dense network: train_one_epoch / evaluate / fit, and `train_arch`,
which retrains an Arch from scratch and writes `model.pt` ({arch, state_dict, recipe, metrics})."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flexslim import distributed
from flexslim.arch import Arch
from flexslim.config import Recipe, TrainConfig, recipe_to_toml
from flexslim.console import Reporter
from flexslim.data import Augment, Batches, Dataset, StreamBatches, StreamedDataset
from flexslim.devices import autocast, cpu_training_kernels, prepare, to_device_batch
from flexslim.errors import BadInput
from flexslim.runs import atomic_torch_save, content_hash, remove
from flexslim.schedules import cosine_lr, drop_path_at, set_drop_path


@dataclass(frozen=True)
class EpochMetrics:
    """One retraining epoch: train loss/accuracy (augmented, as trained), test loss/accuracy, the lr at the
    epoch's first step, and wall-clock seconds."""

    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lr: float
    seconds: float


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


@dataclass
class TrainState:
    """What retraining carries from epoch to epoch, and what its checkpoint holds.

    Attributes:
        model: the network being trained (on the training device).
        optimizer: SGD over all its parameters; the lr is set per step from `schedules.cosine_lr`.
        batches, augment: the shuffled training batches and the augmentation, with their random streams.
        total_steps: steps of the whole run (the cosine schedule's length); step: steps finished.
        history: one EpochMetrics per finished epoch.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Batches | StreamBatches
    augment: Augment
    total_steps: int
    step: int = 0
    history: list[EpochMetrics] = field(default_factory=list)

    identity: dict = field(default_factory=dict)  # what the checkpoint belongs to (`train_identity`)

    def save(self, path: Path) -> None:
        """Write the resume checkpoint (atomically)."""
        atomic_torch_save(
            path,
            {
                "identity": self.identity,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "batch_rng": self.batches.generator.get_state(),
                "augment_rng": self.augment.get_state(),
                "history": [asdict(h) for h in self.history],
            },
        )

    def restore(self, path: Path, device: torch.device) -> None:
        """Load a checkpoint written by `save`; BadInput naming the file when it is unreadable, corrupt or was
        written for another training (recipe, epochs, network)."""
        state = read_train_state(path, self.identity)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
            self.batches.generator.set_state(state["batch_rng"])
            self.augment.set_state(state.get("augment_rng", {}))
            self.history = [EpochMetrics(**m) for m in state["history"]]
        except Exception as err:  # noqa: BLE001 - contents that do not fit this network or schedule
            msg = str(err).splitlines()[0][:160] if str(err) else ""
            raise BadInput(
                f"cannot resume from {path} ({type(err).__name__}: {msg}); delete it or train without --resume"
            ) from None


def train_identity(recipe: Recipe, epochs: int) -> dict:
    """What a training checkpoint belongs to: the resolved recipe's training sections (sha256 of [data], [model]
    without the search's grid `round_to`, [train]) and the epochs."""
    import json
    import tomllib

    d = tomllib.loads(recipe_to_toml(recipe))
    used = {k: d.get(k) for k in ("data", "model", "train")}
    if isinstance(used["model"], dict):
        used["model"] = {k: v for k, v in used["model"].items() if k != "round_to"}
    return {"recipe_sha256": content_hash(json.dumps(used, sort_keys=True, default=str)), "epochs": int(epochs)}


def read_train_state(path: Path, identity: dict | None = None) -> dict:
    """The contents of a train_state.pt, checked against `identity` (`train_identity`) when given: BadInput naming
    the file when it is unreadable, not a training checkpoint, or written for another recipe or epoch count."""
    hint = "delete it or train without --resume"
    try:
        state = distributed.load_on_main(path)  # read by rank 0 (weights_only), handed to every rank
    except Exception as err:  # noqa: BLE001 - garbage, a foreign pickle, a truncated file
        raise BadInput(f"{path} is not a readable training checkpoint ({type(err).__name__}); {hint}") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "history"} <= set(state):
        raise BadInput(f"{path} is not a flexslim training checkpoint; {hint}")
    saved = state.get("identity")
    if identity:
        if not isinstance(saved, dict) or not saved:
            raise BadInput(f"{path} does not record which training it belongs to (an older flexslim); {hint}")
        if saved.get("epochs") != identity["epochs"]:
            raise BadInput(
                f"{path} is a training of {saved.get('epochs')} epochs, not {identity['epochs']}: a resumed run "
                f"cannot change its schedule; resume with --epochs {saved.get('epochs')}, or {hint}"
            )
        if saved.get("recipe_sha256") != identity["recipe_sha256"]:
            raise BadInput(
                f"{path} was written with another recipe (the resolved recipe differs): a resumed run cannot mix "
                f"two; resume with the run's own recipe, or {hint}"
            )
    return state


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
        xb, yb = distributed.shard(xb), distributed.shard(yb)
        with autocast(device):
            logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            aux = getattr(model, "aux_logits", None)
            if aux_weight and aux is not None:
                loss = loss + aux_weight * F.cross_entropy(aux.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(list(model.parameters()), len(yb), n)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for g in optimizer.param_groups:
            g["lr"] = cosine_lr(cfg.lr, ts.step, ts.total_steps)
        optimizer.step()
        ts.step += 1
        loss_sum += float(loss.detach()) * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(yb)
        reporter.advance(f"loss {float(loss.detach()):.3f}")
    loss_sum, correct, seen = distributed.sum_over_ranks([loss_sum, correct, seen])
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
    distributed.broadcast_module(ts.model)  # rank 0's BN statistics (each rank saw only its shards)
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
    ds: Dataset | StreamedDataset,
    device: torch.device,
    epochs: int | None = None,
    reporter: Reporter | None = None,
    resume: bool = False,
) -> list[EpochMetrics]:
    """Retrain `arch` from scratch (seeded init, then `fit`) and write run_dir/model.pt.

    Args:
        arch: the network to build (with the auxiliary head if recipe.model.auxiliary_weight > 0).
        recipe: the training settings; run_dir: where model.pt and the per-epoch train_state.pt go.
        ds: moved to `device` for training; epochs: default the recipe's.
        resume: continue from run_dir/train_state.pt if it exists (else it is discarded).

    Returns:
        The per-epoch metrics (also stored in model.pt); the resume checkpoint is removed at the end.
    """
    from flexslim.spaces import build_network

    distributed.check_recipe(lambda: recipe, search=False)
    torch.manual_seed(recipe.train.seed)
    model = build_network(arch, auxiliary=recipe.model.auxiliary_weight > 0)
    if recipe.model.pretrained:  # a user's backbone: retrain (fine-tune) from it, not from scratch
        from flexslim.pretrained import load_pretrained

        load_pretrained(model, recipe.model.pretrained)
    if recipe.distributed.sync_bn:
        model = distributed.sync_batchnorm(model)
    ckpt = run_dir / "train_state.pt"
    if not resume:
        remove(ckpt)
    history = fit(model, ds.to(device), recipe, device, epochs, reporter, checkpoint=ckpt)
    save_model(run_dir / "model.pt", arch, model, recipe, history)
    remove(ckpt)
    return history


@dataclass(frozen=True)
class TrainRun:
    run_dir: Path
    arch: Arch
    recipe: Recipe
    dataset: Dataset | StreamedDataset


def open_train_run(
    target: Path | None,
    recipe_name: str | None,
    overrides: list[str],
    data_dir: Path | None,
    *,
    resume: bool = False,
    epochs: int | None = None,
) -> TrainRun:
    """Where `flexslim train` writes and what it trains; every input is checked before anything is created.

    - a run directory: its arch.json, with its recipe.toml unless `--recipe` is given (locked for this process);
    - an arch.json: a new run directory holding a copy of it;
    - nothing: a new run directory with the recipe's own (initial) widths.

    With `resume`, the run directory must hold a train_state.pt written for the same recipe and `epochs` (default
    the recipe's); an arch.json or nothing has nothing to resume (BadInput).
    """
    from flexslim.arch import arch_json
    from flexslim.data import load_dataset
    from flexslim.runs import atomic_write_text, lock_run, mark_latest, new_run_dir

    arch, recipe, run_dir = _train_target(target, recipe_name, overrides, resume)
    if resume:
        state = run_dir / "train_state.pt"
        if not distributed.on_main(state.is_file):
            raise BadInput(f"train --resume: {run_dir} has no train_state.pt (no interrupted training); drop --resume")
        read_train_state(state, train_identity(recipe, recipe.train.epochs if epochs is None else epochs))
    with distributed.main_first():  # a download happens once
        ds = load_dataset(recipe.data, data_dir)
    if arch is None:
        arch = Arch.for_data(recipe.model, ds)
    if arch.input_shape != ds.input_shape or arch.dataset != ds.name:
        raise BadInput(
            f"the arch is for {arch.dataset} {list(arch.input_shape)} but the recipe's data is {ds.name} "
            f"{list(ds.input_shape)}; pick the matching --recipe"
        )
    if run_dir is None:
        run_dir = distributed.on_main(lambda: new_run_dir(recipe.name))
        lock_run(run_dir)
        atomic_write_text(run_dir / "arch.json", arch_json(arch))
        mark_latest(run_dir)
    else:
        lock_run(run_dir)  # BadInput when another job is writing this run
    if not resume:  # a resumed training keeps the recipe.toml it started with (checked equal above)
        atomic_write_text(run_dir / "recipe.toml", recipe_to_toml(recipe))
    return TrainRun(run_dir, arch, recipe, ds)


def _train_target(target: Path | None, recipe_name: str | None, overrides: list[str], resume: bool):
    """(arch or None, recipe, existing run directory or None) of `flexslim train TARGET`; nothing is created."""
    from flexslim.arch import load_arch
    from flexslim.config import load_recipe

    if resume and (target is None or not target.is_dir()):
        what = f"{target} is not a run directory" if target is not None else "no run directory was given"
        raise BadInput(f"train --resume: {what}, so there is nothing to resume; pass the run's folder or drop --resume")
    if target is not None and target.is_dir():
        recipe_src = recipe_name or (
            str(target / "recipe.toml") if (target / "recipe.toml").is_file() else "quickstart"
        )
        return load_arch(target / "arch.json"), load_recipe(recipe_src, overrides), target
    recipe = load_recipe(recipe_name or "quickstart", overrides)
    if target is None:
        return None, recipe, None
    if not target.is_file():
        raise BadInput(f"{target} is neither a run directory nor an arch.json file")
    return load_arch(target), recipe, None
