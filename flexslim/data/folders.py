"""Image-folder datasets: `--data DIR` with train/ and val/ (or test/) of class sub-folders (torchvision's
ImageFolder layout), decoded once into uint8 tensors at `data.image_size`.

    DIR/train/cat/001.jpg   DIR/train/dog/...      (any image format PIL reads, any size)
    DIR/val/cat/...         DIR/val/dog/...        (or DIR/test/...)

Classes are the sub-folder names in sorted order (ImageFolder's convention); their names travel into arch.json
and the ONNX metadata. Every image is resized (shorter side) and centre-cropped to image_size x image_size; the
search and training then augment whole batches on the device (`data.Augment`), as for CIFAR-10. Normalisation
is the training images' per-channel mean/std unless the recipe gives `data.mean`/`data.std`.

Colour: `data.channels = 0` keeps what the images are (all greyscale: 1 channel, all colour: 3) and REFUSES a
mix of the two, naming an example of the minority; `data.channels = 3` (or 1) converts every image.

Decoding runs in DataLoader worker processes. A set whose decoded size fits in `data.max_in_memory_mb` is decoded
once and held as tensors on the training device (`data.Dataset`). A larger one, or any with `data.stream = true`,
is a `data.StreamedDataset`: the file lists, decoded per batch in `data.workers` worker processes each epoch (the
same decoding, so the same pixels and, for the same seeds, the same batches). Loading it reads only the image
headers (for the colour check) and, unless `data.mean`/`data.std` are given, decodes the training images once
for their statistics. A file that does not decode then fails the batch it is in, naming it.

Pixel cap: an image whose header says width x height > `data.max_pixels` is refused before any of its pixels are
decoded (a decompression bomb: a small file that decodes to gigabytes), naming the file and the key that raises the
cap. PIL's own decompression-bomb check (`Image.MAX_IMAGE_PIXELS`, which also guards GIF frames while decoding) is
set to the same limit, and its warning and error are the same refusal. Every file's header is read when the folder
is loaded (in memory: the decoding pass; streamed: the header pass), so a run fails before it trains.

Bad input is one `BadInput` line each: no train/ or val/, a split without class folders, an image that does
not decode or is over the pixel cap (named), a class in train but not in val (or the reverse), mixed grey/colour
images. Decoding workers never raise: they hand back the error line, and the main process raises it.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from flexslim.data.tensors import Dataset, StreamBatches, StreamedDataset, TrainingData, default_workers, worker_init
from flexslim.errors import BadInput
from flexslim.recipe.schema import DataConfig

TEST_SPLITS = ("val", "test")
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


_PIL_PIXELS = re.compile(r"\((\d+) pixels\)")  # the pixel count in PIL's decompression-bomb message
EVAL_MAX_PIXELS = DataConfig().max_pixels  # `validate --data` reads no recipe: the key's default applies


class _Refused(Exception):
    """An image file that is not read; its text is the whole error line (raised by the main process)."""


def _too_large(path: str, pixels: int | None, max_pixels: int, key: str | None) -> str:
    """The error line of an image over the cap (`pixels`: its width x height, when known)."""
    size = f"{pixels:,} pixels (width x height)" if pixels else "more pixels than that"
    if key is None:
        return (
            f"image {path} has {size}, over the limit of {max_pixels:,} pixels an image may have; shrink or remove it"
        )
    fix = f"set {key}={pixels} to allow it" if pixels else f"raise {key} to allow it"
    return f"image {path} has {size}, over {key} = {max_pixels:,}; {fix}, or remove the image"


def _not_decoding(path: str) -> str:
    return f"image {path} does not decode; remove or replace it"


BROKEN = (OSError, ValueError, SyntaxError)  # what PIL's decoders raise for broken or foreign files


@contextlib.contextmanager
def _checked_image(path: str, max_pixels: int, key: str | None, decode: bool):
    """The image at `path`, opened by PIL lazily (the header read) and, with `decode`, its pixels decoded; closed on
    exit. `_Refused` when PIL cannot identify or decode it, or it has more than `max_pixels` pixels: by its header,
    before any pixel is decoded, and by PIL's decompression-bomb check (header, GIF frames), set to the same limit
    with its warning raised as an error. `key` names the setting that raises the cap (None: none does)."""
    from PIL import Image

    def refused(err: Exception) -> _Refused:
        if isinstance(err, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
            found = _PIL_PIXELS.search(str(err))
            return _Refused(_too_large(path, int(found.group(1)) if found else None, max_pixels, key))
        return _Refused(_not_decoding(path))

    bombs = (Image.DecompressionBombWarning, Image.DecompressionBombError)
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own check at the key's limit (set in every worker: spawn or fork)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # past the limit: a refusal, not a warning
        try:
            img = Image.open(path)
        except (*bombs, *BROKEN) as err:
            raise refused(err) from None
        with img:
            pixels = img.width * img.height
            if pixels > max_pixels:  # the cap's own check of the header, whatever PIL's global says meanwhile
                raise _Refused(_too_large(path, pixels, max_pixels, key))
            if decode:
                try:
                    img.load()
                except (*bombs, *BROKEN) as err:
                    raise refused(err) from None
            yield img


class _Images(torch.utils.data.Dataset):
    """(path, label) -> (uint8 3xSxS tensor, label, was-grey), or (None, label, the error line) when the file does
    not decode or is over `max_pixels` (`_checked_image`)."""

    def __init__(
        self, samples: Sequence[tuple[str, int]], size: int, max_pixels: int, key: str | None = "data.max_pixels"
    ):
        self.samples, self.size, self.max_pixels, self.key = list(samples), int(size), int(max_pixels), key

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision.transforms.v2 import functional as TF

        path, label = self.samples[i]
        try:
            with _checked_image(path, self.max_pixels, self.key, decode=True) as img:
                grey = img.mode in GREY_MODES
                x = TF.pil_to_tensor(img.convert("RGB"))
        except _Refused as refused:
            return None, label, str(refused)
        except BROKEN:  # the conversion of a broken file
            return None, label, _not_decoding(path)
        x = TF.center_crop(TF.resize(x, self.size, antialias=True), [self.size, self.size])
        return x, label, grey


class _StreamImages(_Images):
    """(path, label) -> (uint8 `channels` x S x S tensor, label, "") or (None, label, the error line naming the file):
    the items of a streamed folder (`data.collate_items` gathers them)."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        size: int,
        channels: int,
        max_pixels: int,
        key: str | None = "data.max_pixels",
    ):
        super().__init__(samples, size, max_pixels, key)
        self.channels = channels

    def __getitem__(self, i: int):
        x, label, grey_or_error = super().__getitem__(i)
        return (None, label, grey_or_error) if x is None else (to_channels(x, self.channels), label, "")


class _Headers(torch.utils.data.Dataset):
    """path -> was-grey (True/False) from the image header alone (`_checked_image`), or the error line when PIL cannot
    identify the file or it is over `max_pixels`."""

    def __init__(self, samples: Sequence[tuple[str, int]], max_pixels: int):
        self.paths, self.max_pixels = [path for path, _ in samples], int(max_pixels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            with _checked_image(self.paths[i], self.max_pixels, "data.max_pixels", decode=False) as img:
                return img.mode in GREY_MODES
        except _Refused as refused:
            return str(refused)


def _keep(batch):
    return batch  # a list of (tensor | None, label, grey or error line): the main process raises the errors


def find_split(root: Path, split: str | None = None) -> Path:
    """`root/train` (split="train"), the first of root/val, root/test (split=None); BadInput when missing."""
    names = ("train",) if split == "train" else TEST_SPLITS
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise BadInput(
        f"--data {root}: no {' or '.join(n + '/' for n in names)} folder; expected {root}/train/<class>/<image> and "
        f"{root}/val/<class>/<image> (or test/)"
    )


def scan(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folders) and (path, index) samples, by torchvision's ImageFolder rules, except that
    only regular files are read (a FIFO named x.jpg would block) and no symbolic link is followed out of
    `split_dir` or into a folder (no link loops)."""
    import stat

    from torchvision.datasets.folder import IMG_EXTENSIONS

    inside = os.path.realpath(split_dir)
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir(follow_symlinks=False))
    if not classes:
        raise BadInput(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>, one folder per class")
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        found = []
        for folder, dirs, names in os.walk(split_dir / name, followlinks=False):
            dirs.sort()
            for file in sorted(names):
                path = os.path.join(folder, file)
                if not file.lower().endswith(IMG_EXTENSIONS):
                    continue
                real = os.path.realpath(path)
                if os.path.commonpath([inside, real]) != inside:
                    continue  # a link out of the dataset folder is not read
                try:
                    if not stat.S_ISREG(os.stat(real).st_mode):
                        continue  # FIFOs, devices, sockets: never opened
                except OSError:
                    continue  # a dangling link
                found.append((path, index))
        if not found:
            raise BadInput(
                f"{split_dir}: class folder {name} has no image file ({', '.join(IMG_EXTENSIONS[:4])}, ...); add "
                "images or remove the folder"
            )
        samples += found
    return classes, samples


def decode(
    samples: Sequence[tuple[str, int]],
    size: int,
    workers: int | None = None,
    max_pixels: int = EVAL_MAX_PIXELS,
    key: str | None = "data.max_pixels",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 N x 3 x size x size, int64 labels, bool was-grey) of every sample; BadInput names a file that does not
    decode or is over `max_pixels` (`_checked_image`)."""
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    loader = torch.utils.data.DataLoader(
        _Images(samples, size, max_pixels, key),
        batch_size=64,
        num_workers=workers if len(samples) > 2048 else 0,  # starting workers costs more than a few images
        collate_fn=_keep,
        worker_init_fn=worker_init(),
    )
    xs, ys, greys = [], [], []
    i = 0
    for batch in loader:
        for x, label, grey in batch:
            if x is None:
                raise BadInput(grey)  # the worker's error line, naming the file
            xs.append(x)
            ys.append(label)
            greys.append(grey)
            i += 1
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), torch.tensor(greys, dtype=torch.bool)


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 RGB -> `channels` (3: as is, 1: ITU-R 601 luma, as PIL's convert('L'))."""
    if channels == 3:
        return x
    if channels == 1:
        from torchvision.transforms.v2 import functional as TF

        return TF.rgb_to_grayscale(x, num_output_channels=1)
    raise BadInput(f"data.channels must be 0 (as the images are), 1 or 3, got {channels}")


def _channels(requested: int, grey: torch.Tensor, samples: Sequence[tuple[str, int]]) -> int:
    if requested:
        return requested
    n_grey = int(grey.sum())
    if n_grey == 0:
        return 3
    if n_grey == len(grey):
        return 1
    minority = grey if n_grey < len(grey) - n_grey else ~grey
    example = samples[int(minority.nonzero()[0])][0]
    raise BadInput(
        f"mixed greyscale and colour images ({n_grey} greyscale, {len(grey) - n_grey} colour, e.g. {example}); "
        "set data.channels = 3 to convert all to RGB (or 1 for greyscale)"
    )


STATS_CHUNK = 1024  # images per chunk of the mean/std sums (the same chunks in memory and streamed: same numbers)


def _mean_std(chunks) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images given in chunks (N x C x H x W each), in [0, 1] units."""
    s = s2 = None
    n = 0
    for chunk in chunks:
        c = chunk.shape[1]
        if s is None:
            s, s2 = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        f = chunk.to(torch.float64).div_(255.0).transpose(0, 1).reshape(c, -1)
        s += f.sum(1)
        s2 += (f * f).sum(1)
        n += f.shape[1]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(float(v) for v in mean), tuple(max(float(v), 1e-3) for v in std)


def decoded_mb(n: int, channels: int, size: int) -> float:
    """Size of n decoded uint8 images, in MB."""
    return n * channels * size * size / 2**20


def load_folder(cfg: DataConfig, data_dir: str | Path | None) -> TrainingData:
    """The `folder` dataset of a recipe: train/ and val/ (or test/) under `data_dir`; in memory, or streamed when
    `data.stream` is set or the decoded images would take more than `data.max_in_memory_mb`."""
    if data_dir is None:
        raise BadInput("data.dataset = folder needs --data DIR (DIR/train/<class>/... and DIR/val/<class>/...)")
    root = Path(data_dir)
    if not root.is_dir():
        raise BadInput(f"--data {root} is not a folder")
    train_dir, test_dir = find_split(root, "train"), find_split(root)
    classes, train_samples = scan(train_dir)
    test_classes, test_samples = scan(test_dir)
    missing, extra = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
    if missing:
        raise BadInput(
            f"class(es) {', '.join(missing)} in {train_dir} but not in {test_dir}; give each class images there"
        )
    if extra:
        raise BadInput(
            f"class(es) {', '.join(extra)} in {test_dir} but not in {train_dir}; no training images for them"
        )
    if cfg.channels not in (0, 1, 3):
        raise BadInput(f"data.channels must be 0 (as the images are), 1 or 3, got {cfg.channels}")
    mb = decoded_mb(len(train_samples) + len(test_samples), cfg.channels or 3, cfg.image_size)
    if cfg.stream or mb > cfg.max_in_memory_mb:
        return _streamed_folder(cfg, train_samples, test_samples, tuple(classes))
    trx, try_, tr_grey = decode(train_samples, cfg.image_size, max_pixels=cfg.max_pixels)
    tex, tey, te_grey = decode(test_samples, cfg.image_size, max_pixels=cfg.max_pixels)
    channels = _channels(cfg.channels, torch.cat([tr_grey, te_grey]), train_samples + test_samples)
    trx, tex = to_channels(trx, channels), to_channels(tex, channels)
    given = _given_mean_std(cfg, channels)
    mean, std = given or _mean_std(trx.split(STATS_CHUNK))
    return Dataset("folder", trx, try_, tex, tey, len(classes), mean, std, class_names=tuple(classes))


def _given_mean_std(cfg: DataConfig, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if not (cfg.mean or cfg.std):
        return None
    if len(cfg.mean) != channels or len(cfg.std) != channels or min(cfg.std) <= 0:
        raise BadInput(f"data.mean and data.std need {channels} values each (std > 0), one per image channel")
    return tuple(cfg.mean), tuple(cfg.std)


def _header_greys(samples: Sequence[tuple[str, int]], workers: int, max_pixels: int) -> torch.Tensor:
    """Was-grey of every sample from its header (no decoding); BadInput names a file PIL cannot identify or one
    over `max_pixels`."""
    loader = torch.utils.data.DataLoader(
        _Headers(samples, max_pixels),
        batch_size=256,
        num_workers=workers if len(samples) > 2048 else 0,
        collate_fn=_keep,
        worker_init_fn=worker_init(),
    )
    greys = [g for batch in loader for g in batch]
    for g in greys:
        if isinstance(g, str):
            raise BadInput(g)  # the worker's error line, naming the file
    return torch.tensor(greys, dtype=torch.bool)


def _streamed_folder(
    cfg: DataConfig,
    train_samples: list[tuple[str, int]],
    test_samples: list[tuple[str, int]],
    classes: tuple[str, ...],
) -> StreamedDataset:
    """The folder as file lists decoded per batch (see the module notes): every header read (the pixel cap and the
    colour check) and, unless given, the training images' mean/std from one decoding pass."""
    workers = default_workers() if cfg.workers < 0 else cfg.workers
    everything = train_samples + test_samples
    greys = _header_greys(everything, workers, cfg.max_pixels)  # before training: a file over the cap fails the load
    channels = cfg.channels or _channels(0, greys, everything)
    train = _StreamImages(train_samples, cfg.image_size, channels, cfg.max_pixels)
    test = _StreamImages(test_samples, cfg.image_size, channels, cfg.max_pixels)
    given = _given_mean_std(cfg, channels)
    if given is None:
        chunks = StreamBatches(train, STATS_CHUNK, workers=workers)
        given = _mean_std(x for x, _ in chunks.decoded())
    shape = (channels, cfg.image_size, cfg.image_size)
    return StreamedDataset("folder", train, test, shape, len(classes), *given, class_names=classes, workers=workers)


def load_eval_folder(
    data_dir: str | Path | None, image_size: int, channels: int, class_names: Sequence[str] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Test images for `validate`: `data_dir` is a split (class folders) or a dataset root (its val/ or test/).

    Labels follow `class_names` (the model's, from its metadata) when given, else the sorted folder names.
    """
    x, y, _ = decode(eval_samples(data_dir, class_names), image_size, max_pixels=EVAL_MAX_PIXELS, key=None)
    return to_channels(x, channels), y


def eval_folder_batches(
    data_dir: str | Path | None, image_size: int, channels: int, class_names: Sequence[str] = (), batch_size: int = 256
) -> StreamBatches:
    """The images of `load_eval_folder`, streamed: float [0, 1] batches and labels, in order, decoded by workers."""
    samples = eval_samples(data_dir, class_names)
    workers = default_workers() if len(samples) > 2048 else 0  # starting workers costs more than a few images
    items = _StreamImages(samples, image_size, channels, EVAL_MAX_PIXELS, key=None)
    return StreamBatches(items, batch_size, workers=workers)


def eval_samples(data_dir: str | Path | None, class_names: Sequence[str] = ()) -> list[tuple[str, int]]:
    """(path, label) of the test images under `data_dir` (see `load_eval_folder`)."""
    if data_dir is None:
        raise BadInput("the folder dataset needs --data DIR (a folder of class sub-folders, e.g. DIR/val)")
    root = Path(data_dir)
    if not root.is_dir():
        raise BadInput(f"--data {root} is not a folder")
    if (root / "train").is_dir():
        split = find_split(root)
    elif any((root / name).is_dir() for name in TEST_SPLITS):
        raise BadInput(
            f"--data {root} has {'/'.join(n for n in TEST_SPLITS if (root / n).is_dir())}/ but no train/: pass the "
            f"split folder itself (e.g. --data {root / next(n for n in TEST_SPLITS if (root / n).is_dir())})"
        )
    else:
        split = root
    classes, samples = scan(split)
    if class_names:
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise BadInput(f"{split}: class(es) {', '.join(unknown)} not among the model's {len(class_names)} classes")
        index = {name: i for i, name in enumerate(class_names)}
        samples = [(path, index[classes[label]]) for path, label in samples]
    return samples
