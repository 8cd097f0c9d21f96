"""The `flexslim train` job: retrain an arch (or a run's arch) from scratch into a run folder, resumable.

`train_arch` writes model.pt (and train_state.pt while it runs); `open_train_run` resolves the target, the recipe
and the run folder (locked) for the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flexslim.data.tensors import Dataset, StreamedDataset
from flexslim.errors import BadInput
from flexslim.models.arch import Arch
from flexslim.recipe.schema import Recipe, recipe_to_toml
from flexslim.system import collectives, distributed
from flexslim.system.console import Reporter
from flexslim.system.files import remove
from flexslim.train.checkpoint import EpochMetrics, read_train_state, save_model, train_identity
from flexslim.train.loop import fit


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
    """Retrain `arch` from scratch (seeded init, then `fit`) - or, with `train.init = searched` (and by default, `auto`,
    where the run has them), fine-tune the run's searched weights (run_dir/supernet_baked.pt) - and write
    run_dir/model.pt.

    Args:
        arch: the network to build (with the auxiliary head if recipe.model.auxiliary_weight > 0).
        recipe: the training settings; run_dir: where model.pt and the per-epoch train_state.pt go.
        ds: moved to `device` for training; epochs: default the recipe's.
        resume: continue from run_dir/train_state.pt if it exists (else it is discarded).

    Returns:
        The per-epoch metrics (also stored in model.pt); the resume checkpoint is removed at the end.
    """
    from flexslim.models.families import build_network

    distributed.check_recipe(lambda: recipe, search=False)
    torch.manual_seed(recipe.train.seed)
    model = build_network(arch, auxiliary=recipe.model.auxiliary_weight > 0)
    init = recipe.train.init
    if init == "searched" or (init == "auto" and (run_dir / SEARCHED).is_file()):
        load_searched(model, arch, run_dir / SEARCHED)  # the searched weights (they hold any pretrained start)
    elif recipe.model.pretrained:  # a user's backbone: retrain (fine-tune) from it, not from scratch
        from flexslim.models.pretrained import load_pretrained

        load_pretrained(model, recipe.model.pretrained)
    if recipe.distributed.sync_bn:
        model = collectives.sync_batchnorm(model)
    ckpt = run_dir / "train_state.pt"
    if not resume:
        remove(ckpt)
    history = fit(model, ds.to(device), recipe, device, epochs, reporter, checkpoint=ckpt)
    remove(run_dir / "model.onnx")  # a search's own export of the model.pt replaced here (`jobs.export.RUN_ONNX`)
    save_model(run_dir / "model.pt", arch, model, recipe, history)
    remove(ckpt)
    return history


SEARCHED = "supernet_baked.pt"  # a search run's searched weights at the baked widths (BatchNorm recalibrated)


def load_searched(model: torch.nn.Module, arch: Arch, path: Path) -> None:
    """Load a search run's searched weights (`path`, supernet_baked.pt) into `model`, the network at `arch`'s widths;
    BadInput when the run has none or they are another network's. An auxiliary head (training only) stays as built."""
    if not path.is_file():
        raise BadInput(
            f"train.init = searched needs the searched weights {path} (a search run writes them); "
            "use train.init = scratch for this run"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        saved = Arch.from_dict(payload["arch"], where=str(path))
        state = payload["state_dict"]
    except BadInput:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file
        why = type(err).__name__
        raise BadInput(f"{path} is not a flexslim weights file ({why}); use train.init = scratch") from None
    if saved.widths != arch.widths or saved.family != arch.family:
        raise BadInput(f"{path} holds {saved.family} {saved.widths}, not the network trained here ({arch.widths})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("auxiliary.") for k in missing):
        keys = f"{len(missing)} missing, {len(unexpected)} unexpected keys"
        raise BadInput(f"{path} does not fit the network {arch.widths} ({keys})")


@dataclass(frozen=True)
class TrainRun:
    """A checked `flexslim train` target: its run folder (locked), arch, recipe and dataset."""

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
    from flexslim.data.sources import load_dataset
    from flexslim.models.arch import arch_json
    from flexslim.system.files import atomic_write_text
    from flexslim.system.locks import lock_run
    from flexslim.system.runs import mark_started, new_run_dir

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
        mark_started(run_dir, resumable=False)  # runs/latest only in a workspace's first run; else when trained
    else:
        lock_run(run_dir)  # BadInput when another job is writing this run
    if not resume:  # a resumed training keeps the recipe.toml it started with (checked equal above)
        atomic_write_text(run_dir / "recipe.toml", recipe_to_toml(recipe))
    return TrainRun(run_dir, arch, recipe, ds)


def _train_target(target: Path | None, recipe_name: str | None, overrides: list[str], resume: bool):
    """(arch or None, recipe, existing run directory or None) of `flexslim train TARGET`; nothing is created."""
    from flexslim.models.arch import load_arch
    from flexslim.recipe.schema import load_recipe

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
