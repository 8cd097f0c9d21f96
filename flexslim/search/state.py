"""The search state and its checkpoint: SearchState (what the loop carries from epoch to epoch), a fresh one
(`build_state`, `weight_sgd`) and search_state.pt, the file --resume reads (`checkpoint_identity`, `save_state`,
`load_state`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexslim.errors import BadInput
from flexslim.latency.model import LatencyModel
from flexslim.models.arch import Arch
from flexslim.recipe.schema import Recipe, SearchConfig, recipe_to_toml
from flexslim.search.supernet import Supernet, make_masks
from flexslim.system import collectives, distributed
from flexslim.system.devices import prepare
from flexslim.system.files import atomic_torch_save, content_hash
from flexslim.train.loop import make_sgd


@dataclass
class SearchState:
    """Everything the loop carries from one epoch to the next (and what --resume restores).

    Attributes:
        supernet: the supernet (masks + body at the current allocation).
        w_opt: SGD over the body's weights (rebuilt, momentum transplanted, at each re-allocation).
        a_opt: Adam over the masks' architecture parameters.
        multiplier: the budget controller's Lagrange multiplier (negative when under the budget).
        epoch: epochs finished; step: weight steps finished (the cosine schedule's position).
        history: one record (dict, plain JSON) per finished epoch, as written to search.jsonl.
        mu_sum, mu_steps: the running sum of the masks' mean widths over the averaged last steps (the bake reads
            their mean: mu at the last step is a noisy iterate).
    """

    supernet: Supernet
    w_opt: torch.optim.Optimizer
    a_opt: torch.optim.Optimizer
    multiplier: float
    epoch: int = 0  # epochs finished
    step: int = 0  # weight steps finished
    history: list[dict] = field(default_factory=list)
    mu_sum: dict[str, float] = field(default_factory=dict)  # sum of each stage's mean width over averaged steps
    mu_steps: int = 0  # steps in mu_sum

    def averaged_widths(self) -> dict[str, float] | None:
        """Each stage's mean width averaged over the last `search.average_last` of the steps (None before)."""
        return {k: v / self.mu_steps for k, v in self.mu_sum.items()} if self.mu_steps else None


def weight_sgd(sn: Supernet, cfg: SearchConfig) -> torch.optim.SGD:
    """The weights' optimizer over the supernet's current body."""
    return make_sgd(sn.weight_parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)


def build_state(arch: Arch, recipe: Recipe, device: torch.device) -> SearchState:
    """A fresh search: seeded supernet with the recipe's masks, SGD for the weights, Adam for the masks."""
    cfg = recipe.search
    torch.manual_seed(cfg.seed)
    sync_bn = collectives.sync_batchnorm if recipe.distributed.sync_bn else None
    sn = Supernet(arch, make_masks(arch, recipe.model, cfg), body_fn=sync_bn)
    if recipe.model.pretrained:
        from flexslim.models.pretrained import load_pretrained

        load_pretrained(sn.body, recipe.model.pretrained)
    sn = prepare(sn, device)
    betas = (cfg.arch_beta1, cfg.arch_beta2)
    widest = max(arch.widths.values())
    groups = [
        {"params": list(m.parameters()), "lr": m.stage_lr(cfg, arch.widths[name], widest)}
        for name, m in sn.masks.items()
    ]
    a_opt = torch.optim.Adam(groups, lr=sn.arch_lr(cfg), betas=betas, weight_decay=0.0)
    return SearchState(sn, weight_sgd(sn, cfg), a_opt, cfg.init_multiplier)


def checkpoint_identity(arch: Arch, recipe: Recipe, latency: LatencyModel | None = None) -> dict:
    """What a search checkpoint belongs to: the resolved recipe (sha256 of its TOML), the epochs, the starting
    network (family, stage widths, input) and, when given, the latency model's fit (sha256)."""
    ident = {
        "recipe_sha256": content_hash(recipe_to_toml(recipe)),
        "epochs": recipe.search.epochs,
        "family": arch.family,
        "widths": dict(arch.widths),
        "input_shape": list(arch.input_shape),
    }
    if latency is not None:
        fit = json.dumps([list(latency.terms), list(latency.coef), latency.intercept, latency.floor_ms])
        ident["latency_sha256"] = content_hash(fit)
    return ident


def save_state(path: Path, st: SearchState, identity: dict | None = None) -> None:
    """Write the checkpoint --resume reads (atomically): what it belongs to (`checkpoint_identity`), counters,
    allocation, weights, optimizers, torch RNG."""
    atomic_torch_save(
        path,
        {
            "identity": identity or {},
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
            "mu_sum": st.mu_sum,
            "mu_steps": st.mu_steps,
        },
    )


def _check_identity(path: Path, saved: object, expected: dict) -> None:
    """BadInput naming `path` when the checkpoint was written for another recipe, schedule, network or table."""
    if type(saved) is not dict or not saved:  # a checkpoint, not a mask: plain data
        raise BadInput(
            f"{path} does not record which search it belongs to (written by an older flexslim); "
            "start a new run without --resume"
        )
    what = {
        "recipe_sha256": "the resolved recipe",
        "epochs": "search.epochs",
        "family": "the family",
        "widths": "the starting widths",
        "input_shape": "the input shape",
        "latency_sha256": "the latency model",
    }
    for key, want in expected.items():
        if key in saved and saved[key] != want:
            shown = "" if key.endswith("sha256") else f": checkpoint {saved[key]!r}, this run {want!r}"
            raise BadInput(
                f"{path} belongs to another search ({what.get(key, key)} differs{shown}); resume with the run's "
                "own recipe and latency table, or start a new run without --resume"
            )


def load_state(
    path: Path, arch: Arch, recipe: Recipe, device: torch.device, identity: dict | None = None
) -> SearchState:
    """The SearchState saved by `save_state`; BadInput naming the file if it is unreadable, corrupt or from another
    search: `identity` (default `checkpoint_identity(arch, recipe)`) must match what the file records."""
    hint = "delete it or start a new run without --resume"
    try:
        d = distributed.load_on_main(path)  # read by rank 0 (weights_only), handed to every rank
    except Exception as err:  # noqa: BLE001 - garbage, a foreign pickle, a truncated file
        raise BadInput(f"{path} is not a readable search checkpoint ({type(err).__name__}); {hint}") from None
    if type(d) is not dict:  # torch.load of plain data
        raise BadInput(f"{path} is not a flexslim search checkpoint; {hint}")
    _check_identity(path, d.get("identity"), identity or checkpoint_identity(arch, recipe))
    try:
        if set(d["allocated"]) != set(arch.widths):
            raise ValueError(f"its stages {sorted(d['allocated'])} are not this network's {sorted(arch.widths)}")
        st = build_state(arch, recipe, device)
        st.supernet.reallocate(d["allocated"])
        st.supernet.masks.load_state_dict(d["masks"])
        st.supernet.body.load_state_dict(d["body"])
        prepare(st.supernet, device)
        st.w_opt = weight_sgd(st.supernet, recipe.search)
        st.w_opt.load_state_dict(d["w_opt"])
        st.a_opt.load_state_dict(d["a_opt"])
        torch.set_rng_state(d["rng"])
        st.epoch, st.step, st.multiplier = int(d["epoch"]), int(d["step"]), float(d["multiplier"])
        st.history = list(d["history"])
        st.mu_sum, st.mu_steps = dict(d.get("mu_sum", {})), int(d.get("mu_steps", 0))
    except BadInput:
        raise
    except Exception as err:  # noqa: BLE001 - a checkpoint whose contents do not fit this search
        msg = str(err).splitlines()[0][:160] if str(err) else ""
        raise BadInput(f"cannot resume from {path} ({type(err).__name__}: {msg}); {hint}") from None
    return st
