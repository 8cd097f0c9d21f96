"""Copy what overlaps from a network into one rebuilt at other widths (prefix layout).

Channel c of a stage keeps index c in every tensor that has a dimension of that stage's width, so the
overlap of two same-named tensors is the leading slice along every dimension. Weights, BatchNorm
statistics and SGD momentum buffers are copied over that overlap; whatever lies outside it keeps the new
network's fresh initialisation (momentum: zero). The same copy bakes a supernet into a smaller dense net.

A layer whose input is a concatenation of equal blocks (the DARTS family's 4-node cell outputs) says so
with an `in_chunks` attribute: dimension 1 of its weight is then split into that many blocks and the
overlap is taken block by block (node k's channel c sits at k*C + c, whatever C is).
"""

from __future__ import annotations

import torch
from torch import nn


def _overlap(dst: torch.Tensor, src: torch.Tensor) -> tuple[slice, ...]:
    return tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))


@torch.no_grad()
def copy_overlap(dst: torch.Tensor, src: torch.Tensor, chunks: dict[int, int] | None = None) -> None:
    """dst[overlap] = src[overlap]; `chunks` maps a dimension to its number of concatenated equal blocks."""
    if dst.dim() != src.dim():
        raise ValueError(f"cannot transplant a {src.dim()}-d tensor into a {dst.dim()}-d one")
    if dst.dim() == 0:
        dst.copy_(src)
        return
    for dim, n in sorted((chunks or {}).items(), reverse=True):
        if n > 1:  # view (..., n, size / n, ...) so the prefix overlap is taken inside every block
            dst = dst.unflatten(dim, (n, dst.shape[dim] // n))
            src = src.unflatten(dim, (n, src.shape[dim] // n))
    region = _overlap(dst, src)
    dst[region] = src[region].to(dst.dtype)


def chunk_map(module: nn.Module) -> dict[str, dict[int, int]]:
    """Parameter name -> {dim: blocks} for every layer that declares `in_chunks` > 1."""
    return {
        f"{name}.weight" if name else "weight": {1: m.in_chunks}
        for name, m in module.named_modules()
        if getattr(m, "in_chunks", 1) > 1
    }


@torch.no_grad()
def transplant_state(src: nn.Module, dst: nn.Module) -> int:
    """Copy every same-named parameter and buffer of src into dst over their overlap; returns how many."""
    src_state = src.state_dict()
    chunks = chunk_map(dst)
    n = 0
    for name, tensor in dst.state_dict().items():  # state_dict tensors share storage with the module
        if name in src_state:
            copy_overlap(tensor, src_state[name].to(tensor.device), chunks.get(name))
            n += 1
    return n


def transplant_optimizer(
    src_opt: torch.optim.Optimizer, src: nn.Module, dst_opt: torch.optim.Optimizer, dst: nn.Module
) -> int:
    """Carry per-parameter optimizer state (e.g. SGD momentum) across a rebuild, matched by parameter name.

    Tensors shaped like the parameter are transplanted over the overlap (zeros elsewhere); scalars (step
    counts) are copied. Returns how many parameters received state.
    """
    src_params = dict(src.named_parameters())
    chunks = chunk_map(dst)
    n = 0
    for name, p_new in dst.named_parameters():
        p_old = src_params.get(name)
        if p_old is None or p_old not in src_opt.state:
            continue
        new_state = {}
        for key, value in src_opt.state[p_old].items():
            if torch.is_tensor(value) and value.dim() == p_old.dim() and value.dim() > 0:
                buf = torch.zeros_like(p_new)
                copy_overlap(buf, value, chunks.get(name))
                new_state[key] = buf
            else:
                new_state[key] = value.clone() if torch.is_tensor(value) else value
        dst_opt.state[p_new] = new_state
        n += 1
    return n
