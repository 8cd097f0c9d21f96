"""The IDX datasets (fashion-mnist, mnist, kmnist) read by torchvision from small IDX files written here, the
class-balanced `data.train_subset`, and the one-line BadInput (exit 2) of a broken file."""

from __future__ import annotations

import gzip
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision.datasets
from typer.testing import CliRunner

from flexslim.cli import app
from flexslim.data.sources import IDX_SETS, load_dataset
from flexslim.data.tensors import balanced_subset
from flexslim.errors import BadInput
from flexslim.recipe.schema import DataConfig, load_recipe

IDX_NAMES = ("fashion-mnist", "mnist", "kmnist")
N_TRAIN, N_TEST = 60, 20  # images
INSTALLED = Path("/usr/share/datasets/fashion-mnist")  # the Debian package dataset-fashion-mnist


def idx_bytes(t: torch.Tensor, magic: int | None = None) -> bytes:
    """An IDX file of a uint8 tensor: magic 0x00000800 + number of dimensions, each size (big-endian), the data."""
    head = struct.pack(">I", 0x0800 + t.dim() if magic is None else magic)
    return head + struct.pack(f">{t.dim()}I", *t.shape) + t.contiguous().numpy().tobytes()


def make_set(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random 28x28 images; training labels imbalanced (class 9 has 2 images), test labels 0..9 in turn."""
    g = torch.Generator().manual_seed(seed)
    train_y = torch.cat([torch.arange(9).repeat_interleave(6), torch.tensor([9, 9]), torch.arange(4)])
    return {
        "train-images-idx3-ubyte": torch.randint(0, 256, (N_TRAIN, 28, 28), generator=g, dtype=torch.uint8),
        "train-labels-idx1-ubyte": train_y.to(torch.uint8),
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (N_TEST, 28, 28), generator=g, dtype=torch.uint8),
        "t10k-labels-idx1-ubyte": (torch.arange(N_TEST) % 10).to(torch.uint8),
    }


def write_set(folder: Path, arrays: dict[str, torch.Tensor], gz: bool = True, raw: dict[str, bytes] | None = None):
    """The four files in `folder`, gzipped (`name.gz`) or extracted; `raw` replaces a file's (uncompressed) bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, t in arrays.items():
        data = (raw or {}).get(name, idx_bytes(t))
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def _load(name: str, folder: Path, **kw):
    return load_dataset(DataConfig(dataset=name, image_size=28, **kw), folder)


@pytest.mark.parametrize("layout", ["flat-gz", "torchvision-raw"])
@pytest.mark.parametrize("name", IDX_NAMES)
def test_an_idx_set_loads_as_written(tmp_path, name, layout):
    arrays = make_set()
    cls = IDX_SETS[name].cls
    if layout == "flat-gz":  # the four .gz files, as distributed
        write_set(tmp_path / "d", arrays)
    else:  # what torchvision's download leaves: <DIR>/<Class>/raw/ with the files extracted
        write_set(tmp_path / "d" / cls / "raw", arrays, gz=False)
    ds = _load(name, tmp_path / "d")
    assert ds.name == name and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.class_names == tuple(getattr(torchvision.datasets, cls).classes)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert torch.equal(ds.train_x[:, 0], arrays["train-images-idx3-ubyte"])  # oracle: the pixels written
    assert torch.equal(ds.test_x[:, 0], arrays["t10k-images-idx3-ubyte"])
    assert ds.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    pixels = ds.train_x.double() / 255
    assert ds.mean == pytest.approx((float(pixels.mean()),)) and ds.std == pytest.approx((float(pixels.std()),), 1e-3)
    batch_x, batch_y = next(iter(ds.train_batches(16)))
    assert batch_x.dtype == torch.float32 and batch_x.shape == (16, 1, 28, 28) and float(batch_x.max()) <= 1.0


def test_data_may_name_the_raw_folder_itself_and_the_images_are_resized(tmp_path):
    raw = write_set(tmp_path / "MNIST" / "raw", make_set(), gz=False)
    ds = load_dataset(DataConfig(dataset="mnist", image_size=32), raw)
    assert ds.input_shape == (1, 32, 32) and ds.test_x.shape == (N_TEST, 1, 32, 32) and ds.train_x.dtype == torch.uint8


def test_the_sets_are_in_the_recipe_tables():
    for name in IDX_NAMES:
        r = load_recipe("quickstart", [f"data.dataset={name}", "data.image_size=28"])
        assert r.data.dataset == name


# ---------------------------------------------------------------- data.train_subset


def test_balanced_subset_takes_k_per_class_and_all_of_a_smaller_class():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    idx = balanced_subset(y, 2, seed=0)
    assert idx.tolist() == sorted(idx.tolist()) and Counter(y[idx].tolist()) == {0: 2, 1: 2, 2: 1}


def test_train_subset_is_balanced_deterministic_and_leaves_the_test_set(tmp_path):
    arrays = make_set()
    write_set(tmp_path, arrays)
    full = _load("kmnist", tmp_path)
    a, b = _load("kmnist", tmp_path, train_subset=3), _load("kmnist", tmp_path, train_subset=3)
    counts = Counter(a.train_y.tolist())
    assert counts == {**{c: 3 for c in range(9)}, 9: 2}  # class 9 has only 2 training images
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)  # the same seed: the same images
    other = _load("kmnist", tmp_path, train_subset=3, split_seed=1)
    assert Counter(other.train_y.tolist()) == counts and not torch.equal(other.train_x, a.train_x)
    assert torch.equal(a.test_x, full.test_x) and torch.equal(a.test_y, full.test_y)
    rows = {bytes(x.numpy().tobytes()) for x in full.train_x}
    assert all(bytes(x.numpy().tobytes()) in rows for x in a.train_x)  # a subset of the training images


def test_train_subset_applies_to_every_in_memory_dataset():
    ds = load_dataset(DataConfig(dataset="quickstart", train_subset=5))
    assert Counter(ds.train_y.tolist()) == {c: 5 for c in range(10)} and len(ds.test_y) == 360


def test_train_subset_rule_refuses_a_negative_count():
    with pytest.raises(BadInput, match="data.train_subset"):
        load_recipe("quickstart", ["data.train_subset=-1"])
    assert load_recipe("quickstart").data.train_subset == 0  # the default: all images


# ---------------------------------------------------------------- bad input: one BadInput naming the file


def _cut(arrays, name, keep):
    return {name: idx_bytes(arrays[name])[:keep]}


@pytest.mark.parametrize(
    "case, file, needle",
    [
        ("truncated gzip", "train-images-idx3-ubyte.gz", "truncated"),
        ("truncated data", "t10k-images-idx3-ubyte", "truncated"),
        ("truncated header", "train-labels-idx1-ubyte", "truncated"),
        ("wrong magic", "train-images-idx3-ubyte", "magic"),
        ("labels as images", "t10k-images-idx3-ubyte", "magic"),
        ("count mismatch", "train-labels-idx1-ubyte", "labels"),
        ("label out of range", "t10k-labels-idx1-ubyte", "labels outside"),
    ],
)
def test_a_broken_file_is_one_bad_input_naming_it(tmp_path, case, file, needle):
    arrays = make_set()
    raw = {
        "truncated data": _cut(arrays, "t10k-images-idx3-ubyte", 16 + 5 * 784 + 100),
        "truncated header": _cut(arrays, "train-labels-idx1-ubyte", 6),
        "wrong magic": {"train-images-idx3-ubyte": idx_bytes(arrays["train-images-idx3-ubyte"], magic=0x12345678)},
        "labels as images": {"t10k-images-idx3-ubyte": idx_bytes(arrays["t10k-labels-idx1-ubyte"])},
        "count mismatch": {"train-labels-idx1-ubyte": idx_bytes(arrays["train-labels-idx1-ubyte"][:-3])},
        "label out of range": {"t10k-labels-idx1-ubyte": idx_bytes(torch.full((N_TEST,), 12, dtype=torch.uint8))},
    }.get(case)
    write_set(tmp_path, arrays, raw=raw)
    if case == "truncated gzip":
        gz = tmp_path / "train-images-idx3-ubyte.gz"
        gz.write_bytes(gz.read_bytes()[:-200])
    with pytest.raises(BadInput) as err:
        _load("fashion-mnist", tmp_path)
    message = str(err.value)
    assert file.removesuffix(".gz") in message and needle in message and "\n" not in message, message


def test_a_folder_without_the_files_names_them(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(BadInput, match="t10k-labels-idx1-ubyte.gz"):
        _load("mnist", tmp_path)


def test_no_files_and_no_network_is_one_line_saying_how_to_get_them(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://..., got:\n<urlopen error>")

    monkeypatch.setenv("FLEXSLIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)  # KMNIST's too: it inherits it
    with pytest.raises(BadInput) as err:
        load_dataset(DataConfig(dataset="kmnist", image_size=28))
    message = str(err.value)
    assert "could not be downloaded" in message and "--data DIR" in message and "\n" not in message, message


def test_a_broken_file_through_the_cli_exits_2_with_one_error_line(tmp_path, monkeypatch):
    arrays = make_set()
    bad = {"train-images-idx3-ubyte": idx_bytes(arrays["train-images-idx3-ubyte"], magic=0x0801)}
    write_set(tmp_path / "mnist", arrays, raw=bad)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEXSLIM_LOG_DIR", str(tmp_path / "logs"))
    argv = ["search", "--latency-ms", "1", "--data", "mnist", "--set", "data.dataset=mnist"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, f"exit {res.exit_code}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    text = res.stderr.strip()
    assert "Traceback" not in res.output and len(text.splitlines()) == 1, text
    assert text.startswith("error:") and "train-images-idx3-ubyte" in text, text
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()


# ---------------------------------------------------------------- the real set, where it is installed


@pytest.mark.skipif(not INSTALLED.is_dir(), reason=f"needs {INSTALLED} (apt package dataset-fashion-mnist)")
def test_the_installed_fashion_mnist_with_a_subset():
    ds = load_dataset(DataConfig(dataset="fashion-mnist", image_size=28, train_subset=20))
    assert ds.num_classes == 10 and len(ds.test_y) == 10_000 and set(ds.test_y.tolist()) == set(range(10))
    assert Counter(ds.train_y.tolist()) == {c: 20 for c in range(10)}
    assert ds.mean[0] == pytest.approx(0.286, abs=0.002) and ds.std[0] == pytest.approx(0.353, abs=0.002)
