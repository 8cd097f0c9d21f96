"""What retraining saves: one EpochMetrics per epoch, the resumable TrainState (train_state.pt, with the identity of
the recipe and epoch count it belongs to), and model.pt = {arch, state_dict, recipe, metrics}.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from flexslim.data.augment import Augment
from flexslim.data.tensors import Batches, StreamBatches
from flexslim.errors import BadInput
from flexslim.models.arch import Arch
from flexslim.recipe.schema import Recipe, recipe_to_toml
from flexslim.system import distributed
from flexslim.system.files import atomic_torch_save, content_hash


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


def save_model(path: Path, arch: Arch, model: nn.Module, recipe: Recipe, metrics: list[EpochMetrics] | dict) -> Path:
    # the auxiliary head only serves training: the saved network is the plain one
    """Write model.pt = {arch, state_dict (no auxiliary head), recipe, metrics} atomically."""
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
    from flexslim.models.families import build_network

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
