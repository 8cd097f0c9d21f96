"""Where each dataset comes from: `load_dataset` resolves `data.dataset` through the dataset table
(`recipe.choices.DATASETS`, name -> loader): the bundled digits, CIFAR-10, the IDX sets (Fashion-MNIST, MNIST,
KMNIST), image folders, synthetic data; then cuts an in-memory training set to `data.train_subset` per class.

The IDX sets are read by torchvision's own classes (`torchvision.datasets.FashionMNIST`, `MNIST`, `KMNIST`), from
the first of:

- `--data DIR`: a folder holding the four standard files (train-images-idx3-ubyte, train-labels-idx1-ubyte,
  t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each gzipped `.gz` or extracted), or torchvision's layout
  `DIR/FashionMNIST/raw/` (`MNIST/raw/`, `KMNIST/raw/`; DIR may also name that raw/ folder itself);
- a system folder (Fashion-MNIST: /usr/share/datasets/fashion-mnist, the Debian package dataset-fashion-mnist);
- torchvision's download into the cache folder (`default_cache_dir()`/<name>), which needs a network.

torchvision reads `<root>/<Class>/raw/` with the files extracted, so the four files are staged there in a temporary
folder: linked when extracted, else gunzipped by torchvision's `extract_archive`. A file that is truncated, not an
IDX file (a wrong magic number), or whose image count differs from its label count is one BadInput naming it.
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flexslim.data.cachedir import default_cache_dir
from flexslim.data.tensors import CIFAR10_MEAN, CIFAR10_STD, Dataset, TrainingData, balanced_subset
from flexslim.errors import BadInput
from flexslim.recipe.choices import DATASETS
from flexslim.recipe.schema import DataConfig


def load_dataset(cfg: DataConfig, data_dir: str | Path | None = None) -> TrainingData:
    """The recipe's dataset: in memory, or streamed from disk (a folder over `data.max_in_memory_mb`, or
    `data.stream = true`); its training set cut to `data.train_subset` images per class when that is set."""
    if cfg.stream and cfg.dataset != "folder":
        raise BadInput(f"data.stream = true needs data.dataset = folder ({cfg.dataset} is always held in memory)")
    if cfg.dataset not in DATASETS:
        raise BadInput(f"unknown dataset '{cfg.dataset}'; valid: {', '.join(DATASETS)}")
    module, _, attr = DATASETS[cfg.dataset].partition(":")
    ds = getattr(importlib.import_module(module), attr)(cfg, data_dir)
    if not cfg.train_subset:
        return ds
    if not isinstance(ds, Dataset):
        raise BadInput(
            f"data.train_subset = {cfg.train_subset} needs a dataset held in memory, but this {cfg.dataset} streams "
            "from disk; set data.stream = false and raise data.max_in_memory_mb, or set data.train_subset = 0"
        )
    keep = balanced_subset(ds.train_y, cfg.train_subset, cfg.split_seed).to(ds.train_y.device)
    return dataclasses.replace(ds, train_x=ds.train_x[keep], train_y=ds.train_y[keep])


def load_quickstart(cfg: DataConfig, data_dir: str | Path | None = None) -> Dataset:
    """scikit-learn's bundled digits at `data.image_size`, split 80/20 (stratified, `data.split_seed`; see
    `data.digits`, which reads both without importing scikit-learn)."""
    from flexslim.data import digits

    images, target = digits.load()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    if cfg.image_size != 8:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    x = x.clamp_(0, 1)
    y = torch.tensor(target, dtype=torch.int64)
    idx_train, idx_test = digits.split(target, test_size=0.2, seed=cfg.split_seed)
    tr, te = torch.tensor(idx_train), torch.tensor(idx_test)
    mean, std = x[tr].mean().item(), x[tr].std().item()
    return Dataset("quickstart", x[tr], y[tr], x[te], y[te], 10, (mean,), (std,))


def load_cifar10(cfg: DataConfig, data_dir: str | Path | None = None) -> Dataset:
    """torchvision's CIFAR-10 from `--data DIR` (holding cifar-10-batches-py) or downloaded into the cache."""
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


# -- the IDX sets ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IdxSet:
    """One MNIST-style set: its torchvision class (also the folder name of torchvision's `<root>/<cls>/raw/`) and
    where a system package installs its files."""

    cls: str
    system_dir: str = ""
    package: str = ""  # the package that installs system_dir


IDX_SETS = {
    "fashion-mnist": IdxSet("FashionMNIST", "/usr/share/datasets/fashion-mnist", "apt package dataset-fashion-mnist"),
    "mnist": IdxSet("MNIST"),
    "kmnist": IdxSet("KMNIST"),
}
IDX_FILES = (  # (images, labels) of the training and the test split, as the files are named everywhere
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)
IDX_SIDE = 28  # pixels


def load_idx(cfg: DataConfig, data_dir: str | Path | None = None) -> Dataset:
    """Fashion-MNIST, MNIST or KMNIST (`cfg.dataset`) as uint8 1 x image_size x image_size images (28 resized to
    image_size when it differs), mean/std of the training images; see the module notes for where the files are."""
    import torchvision.datasets

    spec = IDX_SETS[cfg.dataset]
    cls = getattr(torchvision.datasets, spec.cls)
    with tempfile.TemporaryDirectory(prefix="flexslim-idx-") as tmp:
        origins = _stage(_idx_source(cfg.dataset, spec, cls, data_dir), Path(tmp) / spec.cls / "raw")
        splits = (_read_split(cls, tmp, train, files, origins) for train, files in zip((True, False), IDX_FILES))
        (trx, try_), (tex, tey) = splits
    names = tuple(cls.classes)
    for y, (_, labels) in zip((try_, tey), IDX_FILES):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(names)):
            raise BadInput(f"{origins[labels]}: labels outside 0..{len(names) - 1}; is it a {cfg.dataset} label file?")
    if cfg.image_size != IDX_SIDE:
        from torchvision.transforms.v2 import functional as TF

        trx, tex = (TF.resize(x, [cfg.image_size, cfg.image_size], antialias=True) for x in (trx, tex))
    return Dataset(cfg.dataset, trx, try_, tex, tey, len(names), *_grey_mean_std(trx), class_names=names)


def _idx_source(name: str, spec: IdxSet, cls, data_dir: str | Path | None) -> Path:
    """The folder holding the set's four files (see the module notes); a download into the cache when none does."""
    if data_dir is not None:
        root = Path(data_dir)
        for folder in (root, root / "raw", root / spec.cls / "raw"):
            if _has_files(folder):
                return folder
        raise BadInput(
            f"--data {root}: no {name} files there; expected {', '.join(f + '.gz' for pair in IDX_FILES for f in pair)}"
            f" in it (or in {root}/{spec.cls}/raw/)"
        )
    if spec.system_dir and _has_files(Path(spec.system_dir)):
        return Path(spec.system_dir)
    root = default_cache_dir() / name
    raw = root / spec.cls / "raw"
    if _has_files(raw):
        return raw
    try:
        cls(str(root), train=False, download=True)  # fetches all four files into raw/
    except (OSError, RuntimeError) as err:  # torchvision turns every mirror's URLError into one RuntimeError
        where = f"{spec.system_dir} ({spec.package}) or " if spec.system_dir else ""
        raise BadInput(
            f"{name} is not in {where}{raw} and could not be downloaded ({type(err).__name__}: no network?); "
            f"pass --data DIR with its four .gz files{', or install the ' + spec.package if spec.package else ''}"
        ) from None
    return raw


def _has_files(folder: Path) -> bool:
    return all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for pair in IDX_FILES for f in pair)


def _stage(source: Path, raw: Path) -> dict[str, Path]:
    """The four files, extracted, in `raw` (torchvision's `<root>/<cls>/raw/`): linked, or gunzipped by torchvision.
    Returns each file's name -> the file it came from (what an error names)."""
    from torchvision.datasets.utils import extract_archive

    raw.mkdir(parents=True)
    origins = {}
    for name in (f for pair in IDX_FILES for f in pair):
        if (source / name).is_file():
            origins[name] = source / name
            try:
                (raw / name).symlink_to((source / name).resolve())
            except OSError:  # a file system without symbolic links
                shutil.copyfile(source / name, raw / name)
            continue
        gz = origins[name] = source / f"{name}.gz"
        try:
            extract_archive(str(gz), str(raw))  # -> raw/<name>
        except (OSError, EOFError, zlib.error) as err:  # gzip: BadGzipFile is an OSError, a cut stream EOFError
            raise BadInput(
                f"{gz}: truncated or not gzip ({_reason(err)}); replace it with the original download"
            ) from None
    return origins


def _read_split(
    cls, root: str, train: bool, files: tuple[str, str], origins: dict[str, Path]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N x 1 x 28 x 28, int64 labels) of one split, read by torchvision from `root`; BadInput names a broken
    file by its origin."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images, labels = files
    try:
        ds = cls(root, train=train, download=False)
    except (AssertionError, KeyError, ValueError, TypeError, RuntimeError, IndexError) as split_err:
        err: BaseException = split_err
        raw = Path(root) / cls.__name__ / "raw"
        for name, read in ((images, read_image_file), (labels, read_label_file)):  # which file: read each alone
            try:
                read(str(raw / name))
            except (AssertionError, KeyError, ValueError, TypeError, RuntimeError, IndexError) as file_err:
                err = file_err
                break
        else:
            name = images
        raise BadInput(
            f"{origins[name]}: truncated, or not an IDX {'label' if name == labels else 'image'} file (wrong magic "
            f"number) ({_reason(err)}); replace it with the original download"
        ) from None
    x, y = ds.data, ds.targets
    if len(x) != len(y):
        raise BadInput(
            f"{origins[images]} holds {len(x)} images but {origins[labels]} holds {len(y)} labels; "
            "the two files must be of one set"
        )
    return x.unsqueeze(1).contiguous(), y.to(torch.int64)


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:120]}" if text else type(err).__name__


def _grey_mean_std(x: torch.Tensor) -> tuple[tuple[float], tuple[float]]:
    """Mean and std of uint8 grey images in [0, 1] units, exact from the pixel histogram (no float copy)."""
    counts = torch.bincount(x.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum()
    mean = (counts * values).sum() / n
    var = (counts * (values - mean) ** 2).sum() / n
    return (float(mean),), (max(float(var.sqrt()), 1e-3),)
