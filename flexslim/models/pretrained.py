"""Start a network from a checkpoint of other widths (a torchvision state_dict at the original widths):
every same-named tensor is copied over its overlap, as the transplant does."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flexslim.errors import BadInput
from flexslim.models.transplant import copy_overlap


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from `path` (weights_only): a bare one, or under 'state_dict' / 'model'; 'module.' stripped."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"model.pretrained: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle and zip errors of a foreign file
        raise BadInput(f"model.pretrained: {path} is not a torch checkpoint ({type(err).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise BadInput(f"model.pretrained: {path} holds no state_dict (name -> tensor)")
    return {k.removeprefix("module."): v for k, v in state.items()}


@torch.no_grad()
def load_pretrained(net: nn.Module, path: str | Path) -> int:
    """Copy the checkpoint's overlap into `net`; returns the number of tensors copied.

    A final classifier for another number of classes (ImageNet's 1000) is left at its initialisation: its rows
    would name other classes. BadInput when nothing matches (not a checkpoint of this family).
    """
    state = read_state_dict(path)
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    skip: set[str] = set()
    if linears:
        name, last = linears[-1]
        src = state.get(f"{name}.weight")
        if src is not None and src.shape[0] != last.out_features:
            skip = {f"{name}.weight", f"{name}.bias"}
    copied = 0
    for name, tensor in net.state_dict().items():
        src = state.get(name)
        if src is None or name in skip:
            continue
        if src.dim() != tensor.dim():
            raise BadInput(f"model.pretrained: {name} is {src.dim()}-d in {path} but {tensor.dim()}-d here")
        copy_overlap(tensor, src.to(tensor.device))
        copied += 1
    if copied == 0:
        raise BadInput(f"model.pretrained: no tensor name of {path} matches this family's network")
    return copied
