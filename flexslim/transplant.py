"""Copy what overlaps from a network into one rebuilt at other widths (prefix layout).

Channel c of a stage keeps index c in every tensor that has a dimension of that stage's width, so the
overlap of two same-named tensors is the leading slice along every dimension. Weights, BatchNorm
statistics and SGD momentum buffers are copied over that overlap; whatever lies outside it keeps the new
network's fresh initialisation (momentum: zero). The same copy bakes a supernet into a smaller dense net.
"""

from __future__ import annotations

import torch
from torch import nn


def _overlap(dst: torch.Tensor, src: torch.Tensor) -> tuple[slice, ...]:
    return tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))


@torch.no_grad()
def copy_overlap(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.dim() != src.dim():
        raise ValueError(f"cannot transplant a {src.dim()}-d tensor into a {dst.dim()}-d one")
    if dst.dim() == 0:
        dst.copy_(src)
        return
    region = _overlap(dst, src)
    dst[region] = src[region].to(dst.dtype)


@torch.no_grad()
def transplant_state(src: nn.Module, dst: nn.Module) -> int:
    """Copy every same-named parameter and buffer of src into dst over their overlap; returns how many."""
    src_state = src.state_dict()
    n = 0
    for name, tensor in dst.state_dict().items():  # state_dict tensors share storage with the module
        if name in src_state:
            copy_overlap(tensor, src_state[name].to(tensor.device))
            n += 1
    return n


def transplant_optimizer(src_opt: torch.optim.Optimizer, src: nn.Module, dst_opt: torch.optim.Optimizer,
                         dst: nn.Module) -> int:
    """Carry per-parameter optimizer state (e.g. SGD momentum) across a rebuild, matched by parameter name.

    Tensors shaped like the parameter are transplanted over the overlap (zeros elsewhere); scalars (step
    counts) are copied. Returns how many parameters received state.
    """
    src_params = dict(src.named_parameters())
    n = 0
    for name, p_new in dst.named_parameters():
        p_old = src_params.get(name)
        if p_old is None or p_old not in src_opt.state:
            continue
        new_state = {}
        for key, value in src_opt.state[p_old].items():
            if torch.is_tensor(value) and value.dim() == p_old.dim() and value.dim() > 0:
                buf = torch.zeros_like(p_new)
                copy_overlap(buf, value)
                new_state[key] = buf
            else:
                new_state[key] = value.clone() if torch.is_tensor(value) else value
        dst_opt.state[p_new] = new_state
        n += 1
    return n
