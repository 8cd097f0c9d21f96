"""The training device and its fast path: CUDA when present (bf16 autocast, channels_last), else CPU.

torch is imported inside the functions, so the CLI reads DEVICES without loading it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from flexslim.errors import BadInput

if TYPE_CHECKING:
    import torch


DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str = "auto") -> torch.device:
    """The training device for `auto`, `cpu` or `cuda`; BadInput when cuda is asked and absent."""
    import torch

    if name not in DEVICES:
        raise BadInput(f"unknown device '{name}'; valid: {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the GPU fast path); full float32 on the CPU."""
    if device.type == "cuda":
        import torch

        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a network to the device; channels_last on CUDA, where convolutions run faster in NHWC."""
    import torch

    module = module.to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    return module


def to_device_batch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch moved to the device (non-blocking; channels-last on CUDA)."""
    import torch

    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


# oneDNN (torch 2.14.1, this CPU) was seen to stall in the backward pass of convs with 4 channels; the native
# kernels never did. Nets with a stage narrower than this train on the native kernels (2-3x slower steps);
# wider nets keep oneDNN. See `cpu_training_kernels`.
NARROW_CHANNELS = 8


def needs_native_kernels(device: torch.device | str, widths: Iterable[int]) -> bool:
    """True on the CPU when any width (stage, stem or head channels) is under NARROW_CHANNELS."""
    import torch

    return torch.device(device).type == "cpu" and any(0 < int(w) < NARROW_CHANNELS for w in widths)


@contextlib.contextmanager
def cpu_training_kernels(device: torch.device | str, widths: Iterable[int]) -> Iterator[bool]:
    """Run training steps (forward AND backward) inside this: on the CPU, a net with any width under 8 channels
    runs with oneDNN off, so narrow convs use torch's native kernels. Yields whether oneDNN was turned off;
    the previous setting is restored on exit.

        with cpu_training_kernels(device, [arch.stem_width, *widths.values()]):
            for x, y in batches: ...step...
    """
    import torch

    native = needs_native_kernels(device, widths)
    before = torch.backends.mkldnn.enabled
    if native:
        torch.backends.mkldnn.enabled = False
    try:
        yield native
    finally:
        torch.backends.mkldnn.enabled = before
