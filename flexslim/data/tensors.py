"""Datasets as tensors on the training device, the D_t/D_s search split, and their batch iterators.

- `quickstart`: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download), resized
  to `image_size`, split 80/20 into train/test with a fixed seed, stratified by class.
- `cifar10`: torchvision's CIFAR-10, read from `--data DIR` or downloaded into a cache folder.
- `fashion-mnist`, `mnist`, `kmnist`: torchvision's readers of the IDX files (28x28 grey, 10 classes), from
  `--data DIR`, a system folder, or a download into the cache folder (see `sources.py`).
- `folder`: the user's images, `--data DIR` with train/ and val/ (or test/) of class folders (see `folders.py`).

Images are kept as uint8 (CIFAR-10, the IDX sets, folders) or float32 in [0, 1] (quickstart); `Batches` turns them
into float32 batches in [0, 1]. A folder too large for memory (or with `data.stream = true`) is a `StreamedDataset`
instead: images decoded per batch in DataLoader worker processes (pinned memory on CUDA), `StreamBatches` yielding
the same batches in the same order. Both kinds answer the loops' questions alike, written down as the
`TrainingData` protocol: `train_batches`, `test_batches`, `search_halves`, `to(device)`, `num_train`,
`input_shape`, and the description `name`, `num_classes`, `mean`, `std`, `class_names`. `balanced_subset` picks the
`data.train_subset` images per class of an in-memory training set.

Normalisation lives inside the network (`spaces.layers.Normalize`), so the ONNX export takes [0, 1] images too.
Augmentation runs on whole batches on the device: random crop with zero padding (or ImageNet-style
random-resized-crop), horizontal flip, cutout.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Protocol

import torch

from flexslim.errors import BadInput

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class TrainingData(Protocol):
    """What the search and training loops ask of a dataset, in memory (`Dataset`) or streamed (`StreamedDataset`).

    Batches are float32 images in [0, 1] (N x C x H x W) with int64 labels, on the dataset's device.
    """

    @property
    def name(self) -> str: ...  # the dataset's name (recipe.choices.DATASETS); travels into arch.json

    @property
    def num_classes(self) -> int: ...

    @property
    def mean(self) -> tuple[float, ...]: ...  # per-channel normalisation, in [0, 1] units

    @property
    def std(self) -> tuple[float, ...]: ...

    @property
    def class_names(self) -> tuple[str, ...]: ...  # index -> name; () when the data does not name its classes

    @property
    def input_shape(self) -> tuple[int, int, int]: ...  # C, H, W of one image

    @property
    def num_train(self) -> int: ...  # training images

    def to(self, device: torch.device | str) -> TrainingData:
        """The same data, its batches on `device`."""
        ...

    def train_batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Batches | StreamBatches:
        """Batches of the training set; for the same seed and size the same order in either kind."""
        ...

    def test_batches(self, batch_size: int = 500) -> Batches | StreamBatches:
        """Batches of the test set, in order."""
        ...

    def search_halves(self, seed: int = 0) -> tuple[TrainingData, TrainingData]:
        """The data with its training set cut to D_t, and to D_s (two disjoint random halves, `split_indices`)."""
        ...


@dataclass(frozen=True)
class Dataset:
    name: str
    train_x: torch.Tensor  # N, C, H, W; uint8 or float32 in [0, 1]
    train_y: torch.Tensor  # int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()  # index -> name, when the data names its classes (folder)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    def to(self, device: torch.device | str) -> Dataset:
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def train_batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Batches:
        """Batches of the training set (shuffled each epoch by their own generator seeded `seed` when `shuffle`)."""
        return Batches(self.train_x, self.train_y, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def test_batches(self, batch_size: int = 500) -> Batches:
        """Batches of the test set, in order."""
        return Batches(self.test_x, self.test_y, batch_size)

    def search_halves(self, seed: int = 0) -> tuple[Dataset, Dataset]:
        """This dataset with its training set cut to D_t, and to D_s (see `search_split`)."""
        (tx, ty), (sx, sy) = search_split(self, seed)
        return dataclasses.replace(self, train_x=tx, train_y=ty), dataclasses.replace(self, train_x=sx, train_y=sy)


def split_indices(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The D_t and D_s indices of a training set of n: two disjoint random halves (seeded)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2], perm[n // 2 :]


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices (ascending) of `per_class` images of each class drawn at random (seeded); a class with fewer keeps
    all of its images.

    Example: labels [0, 0, 0, 1, 1, 2], per_class 2 -> two of the first three, both 1s, the 2.
    """
    y = labels.cpu()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    by_class = order[torch.argsort(y[order], stable=True)]  # grouped by class, random within each class
    counts = torch.bincount(y)
    first = torch.cumsum(counts, 0) - counts  # where each class starts in by_class
    rank = torch.arange(len(y)) - first[y[by_class]]  # position of each image within its class
    return by_class[rank < per_class].sort().values


def search_split(
    ds: Dataset, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """D_t (trains the weights) and D_s (trains the architecture): two disjoint random halves of train."""
    t, s = (i.to(ds.train_y.device) for i in split_indices(len(ds.train_y), seed))
    return (ds.train_x[t], ds.train_y[t]), (ds.train_x[s], ds.train_y[s])


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


class Batches:
    """Iterates (x, y) batches of a tensor dataset; shuffled with its own generator when `shuffle`."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ):
        self.x, self.y, self.batch_size, self.shuffle, self.drop_last = x, y, batch_size, shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return _num_batches(len(self.y), self.batch_size, self.drop_last)

    def __iter__(self):
        order = _epoch_order(len(self.y), self.shuffle, self.generator).to(self.y.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield as_float(self.x[idx]), self.y[idx]

    def skip_epochs(self, epochs: int) -> None:
        """Advance the shuffle generator past `epochs` epochs, as iterating them would (resume)."""
        for _ in range(epochs if self.shuffle else 0):
            _epoch_order(len(self.y), True, self.generator)


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def _epoch_order(n: int, shuffle: bool, generator: torch.Generator) -> torch.Tensor:
    """One epoch's sample order: the only use of a batch stream's generator (its state is what resume restores)."""
    return torch.randperm(n, generator=generator) if shuffle else torch.arange(n)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def worker_init():
    """The `worker_init_fn` of every flexslim DataLoader: its workers end with the process that started them
    (`die_with_owner`). Call it where the loader is made, in the thread that will iterate it."""
    return functools.partial(die_with_owner, os.getpid(), threading.current_thread() is threading.main_thread())


def die_with_owner(owner_pid: int, death_signal: bool, worker_id: int) -> None:
    """In a DataLoader worker, first: on Linux the parent-death signal (SIGKILL), so the worker ends at once with
    its owner, whatever killed it, and mid-batch (torch's own watchdog polls the parent only between batches, every
    5 s). The prctl of flexslim.system.children.set_death_signal, repeated here: flexslim.data may not import
    flexslim.system. Only asked for when the owner starts workers from its main thread: the kernel sends the
    signal when the starting thread exits. An owner already gone (before the prctl) ends the worker."""
    if death_signal and sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
        except (OSError, AttributeError):
            pass
    if os.name == "posix" and os.getppid() != owner_pid:
        os._exit(128 + 9)


@dataclass(frozen=True)
class StreamedDataset:
    """A dataset read from disk batch by batch: `train` and `test` are map-style datasets of
    (uint8 C x H x W tensor, or None when the item cannot be read; int label; the error line naming it, or "") decoded
    in `workers` DataLoader processes; batches are pinned when the dataset is on CUDA (`to`)."""

    name: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    workers: int = 0
    device: torch.device = torch.device("cpu")
    _tests: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # batch size -> StreamBatches

    @property
    def num_train(self) -> int:
        return len(self.train)

    def to(self, device: torch.device | str) -> StreamedDataset:
        return dataclasses.replace(self, device=torch.device(device))

    def _batches(self, items, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> StreamBatches:
        return StreamBatches(
            items, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, workers=self.workers, device=self.device
        )

    def train_batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> StreamBatches:
        """Batches of the training set (as `Dataset.train_batches`: the same order for the same seed)."""
        return self._batches(self.train, batch_size, shuffle, seed, drop_last)

    def test_batches(self, batch_size: int = 500) -> StreamBatches:
        """Batches of the test set, in order; one stream (and its workers) per batch size, kept for the next call."""
        if batch_size not in self._tests:
            self._tests[batch_size] = self._batches(self.test, batch_size, False, 0, False)
        return self._tests[batch_size]

    def search_halves(self, seed: int = 0) -> tuple[StreamedDataset, StreamedDataset]:
        """This dataset with its training set cut to D_t, and to D_s: the same halves as `Dataset.search_halves`."""
        t, s = split_indices(len(self.train), seed)
        subset = torch.utils.data.Subset
        return (
            dataclasses.replace(self, train=subset(self.train, t.tolist())),
            dataclasses.replace(self, train=subset(self.train, s.tolist())),
        )


class _Order:
    """The batch sampler of a StreamBatches: index lists of `order` (the epoch order its owner drew last). It holds
    no reference to its owner: a cycle would leave the DataLoader to the cyclic GC, which may run it in a worker."""

    def __init__(self, n: int, batch_size: int, drop_last: bool):
        self.order, self.batch_size, self.drop_last = torch.arange(n), batch_size, drop_last

    def __len__(self) -> int:
        return _num_batches(len(self.order), self.batch_size, self.drop_last)

    def __iter__(self):
        order, bs = self.order.tolist(), self.batch_size
        for i in range(len(self)):
            yield order[i * bs : (i + 1) * bs]


def collate_items(items):
    """(uint8 N x C x H x W, int64 labels, the error lines of the items that could not be read)."""
    bad = [where for x, _, where in items if x is None]
    if bad:
        return None, None, bad
    return torch.stack([x for x, _, _ in items]), torch.tensor([label for _, label, _ in items]), []


class StreamBatches:
    """`Batches` over a map-style dataset through a DataLoader: the same interface (len, iteration yielding float
    [0, 1] batches and labels on the device, a `generator` drawing each epoch's order, `skip_epochs`) and, for the
    same seed and size, the same order. Workers decode; they persist across epochs; batches are pinned for CUDA."""

    def __init__(
        self,
        items: torch.utils.data.Dataset,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        workers: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.items, self.batch_size, self.shuffle, self.drop_last = items, batch_size, shuffle, drop_last
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = _Order(len(items), batch_size, drop_last)
        self.loader = torch.utils.data.DataLoader(
            items,
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_items,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            worker_init_fn=worker_init(),
        )

    def __len__(self) -> int:
        return _num_batches(len(self.items), self.batch_size, self.drop_last)

    def decoded(self):
        """This epoch's batches as the workers decoded them: (uint8 N x C x H x W, labels), on the CPU."""
        self.sampler.order = _epoch_order(len(self.items), self.shuffle, self.generator)
        for x, y, bad in self.loader:
            if bad:
                raise BadInput(bad[0])  # the item's own error line, naming it
            yield x, y

    def __iter__(self):
        for x, y in self.decoded():
            yield as_float(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)

    def skip_epochs(self, epochs: int) -> None:
        """Advance the shuffle generator past `epochs` epochs, as iterating them would (resume)."""
        for _ in range(epochs if self.shuffle else 0):
            _epoch_order(len(self.items), True, self.generator)
