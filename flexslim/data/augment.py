"""Batched augmentation on the training device: random crop with zero padding or random-resized-crop, horizontal
flip, cutout; seeded, so a resumed epoch draws the same augmentation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flexslim.recipe.schema import DataConfig


def random_resized_crop(x: torch.Tensor, min_area: float, g: torch.Generator) -> torch.Tensor:
    """Per image: a crop of [min_area, 1] of the area at aspect ratio in [3/4, 4/3] (log-uniform), resized back to
    the batch's H x W (bilinear); torchvision's RandomResizedCrop, batched on the device."""
    n, dev = x.shape[0], x.device
    area = min_area + (1.0 - min_area) * torch.rand(n, generator=g, device=dev)
    log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(n, generator=g, device=dev)
    sx = (area * log_r.exp()).sqrt().clamp(max=1.0)  # crop width / image width
    sy = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (1.0 - sx) * (2 * torch.rand(n, generator=g, device=dev) - 1)  # centre, so the crop stays inside
    cy = (1.0 - sy) * (2 * torch.rand(n, generator=g, device=dev) - 1)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Augment:
    """Random crop (zero padding) or random-resized-crop, horizontal flip and cutout on a whole float batch, on its
    own device."""

    def __init__(self, cfg: DataConfig, seed: int = 0):
        self.pad, self.flip, self.cutout = cfg.crop_padding, cfg.flip, cfg.cutout
        self.resized_crop = cfg.resized_crop
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def _gen(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def get_state(self) -> dict[str, torch.Tensor]:
        return {key: g.get_state() for key, g in self._generators.items()}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self._gen(torch.device(key)).set_state(value.cpu())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        g, dev = self._gen(x.device), x.device
        if self.resized_crop:
            x = random_resized_crop(x, self.resized_crop, g)
        elif self.pad:
            p = self.pad
            padded = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), generator=g, device=dev)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=g, device=dev)
            rows = dy[:, None] + torch.arange(h, device=dev)[None, :]  # n, h
            cols = dx[:, None] + torch.arange(w, device=dev)[None, :]  # n, w
            batch = torch.arange(n, device=dev)[:, None, None]
            # gather per-image windows: n, h, w, c -> n, c, h, w
            x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if self.flip:
            flip = torch.rand(n, generator=g, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.cutout:
            cy = torch.randint(0, h, (n,), generator=g, device=dev)
            cx = torch.randint(0, w, (n,), generator=g, device=dev)
            half = self.cutout // 2
            ys = torch.arange(h, device=dev)[None, :]
            xs = torch.arange(w, device=dev)[None, :]
            in_y = (ys >= (cy[:, None] - half)) & (ys < (cy[:, None] - half + self.cutout))
            in_x = (xs >= (cx[:, None] - half)) & (xs < (cx[:, None] - half + self.cutout))
            hole = in_y[:, :, None] & in_x[:, None, :]
            x = x * (~hole)[:, None, :, :].to(x.dtype)
        return x.contiguous()
