"""Where each dataset comes from: `load_dataset` resolves `data.dataset` (the table in `recipe.choices`) to its
loader - the bundled digits, CIFAR-10 (torchvision, `--data DIR` or a download), image folders, synthetic data.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from flexslim.data.tensors import CIFAR10_MEAN, CIFAR10_STD, Dataset, StreamedDataset
from flexslim.errors import BadInput
from flexslim.recipe.choices import DATASETS
from flexslim.recipe.schema import DataConfig


def load_dataset(cfg: DataConfig, data_dir: str | Path | None = None) -> Dataset | StreamedDataset:
    """The recipe's dataset: in memory, or streamed from disk (a folder over `data.max_in_memory_mb`, or
    `data.stream = true`)."""
    if cfg.stream and cfg.dataset != "folder":
        raise BadInput(f"data.stream = true needs data.dataset = folder ({cfg.dataset} is always held in memory)")
    if cfg.dataset == "quickstart":
        return _quickstart(cfg)
    if cfg.dataset == "cifar10":
        return _cifar10(data_dir)
    if cfg.dataset == "folder":
        from flexslim.data.folders import load_folder

        return load_folder(cfg, data_dir)
    if cfg.dataset == "synthetic":  # random CIFAR-shaped images for timing and memory (see synthetic.py)
        from flexslim.data.synthetic import load_synthetic

        return load_synthetic(cfg)
    raise BadInput(f"unknown dataset '{cfg.dataset}'; valid: {', '.join(DATASETS)}")


def _quickstart(cfg: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    if cfg.image_size != 8:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    x = x.clamp_(0, 1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=0.2, random_state=cfg.split_seed, stratify=digits.target
    )
    tr, te = torch.tensor(idx_train), torch.tensor(idx_test)
    mean, std = x[tr].mean().item(), x[tr].std().item()
    return Dataset("quickstart", x[tr], y[tr], x[te], y[te], 10, (mean,), (std,))


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLEXSLIM_CACHE", Path.home() / ".cache" / "flexslim"))


def _cifar10(data_dir: str | Path | None) -> Dataset:
    from torchvision.datasets import CIFAR10

    if data_dir is not None:
        root = Path(data_dir)
        if root.name == "cifar-10-batches-py":
            root = root.parent
        if not (root / "cifar-10-batches-py").is_dir():
            raise BadInput(f"--data {data_dir}: no cifar-10-batches-py folder there (the python version of CIFAR-10)")
        download = False
    else:
        root = default_cache_dir() / "cifar10"
        download = not (root / "cifar-10-batches-py").is_dir()
    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=False)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise BadInput(
            f"CIFAR-10 is not in {root} and could not be downloaded ({type(err).__name__}); "
            "pass --data DIR with the extracted cifar-10-batches-py folder"
        ) from None

    def tensors(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.int64)

    (trx, try_), (tex, tey) = tensors(train), tensors(test)
    return Dataset("cifar10", trx, try_, tex, tey, 10, CIFAR10_MEAN, CIFAR10_STD)
