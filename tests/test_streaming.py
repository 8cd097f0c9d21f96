"""Streamed folder datasets (data.StreamedDataset): the same images, labels, batches and D_t/D_s halves as the
in-memory folder; training on them equals training in memory and resumes exactly; DataLoader workers; a file that
does not decode; and search -> retrain -> export -> validate end to end with `data.stream = true`."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from folder_fixtures import write_digits_folder
from typer.testing import CliRunner

from flexslim.cli import app
from flexslim.data.sources import load_dataset
from flexslim.data.tensors import Dataset, StreamedDataset
from flexslim.errors import BadInput
from flexslim.models.arch import Arch
from flexslim.models.families import build_network
from flexslim.recipe.schema import DataConfig, load_recipe
from flexslim.system.console import Reporter
from flexslim.train.loop import evaluate, evaluate_batches, fit

CPU = torch.device("cpu")
FOLDER = DataConfig(dataset="folder", image_size=16, crop_padding=2, flip=True, cutout=4, workers=0)
TINY = (
    "model.stem_width=8",
    'model.stages=[{ name = "stage1", width = 8, blocks = 1, stride = 1 }, '
    '{ name = "stage2", width = 16, blocks = 1, stride = 2 }]',
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp("digits"), train_per_class=12, val_per_class=3)


@pytest.fixture(scope="module")
def in_memory(digits) -> Dataset:
    return load_dataset(FOLDER, digits)


def _streamed(digits, **changes) -> StreamedDataset:
    ds = load_dataset(dataclasses.replace(FOLDER, stream=True, **changes), digits)
    assert isinstance(ds, StreamedDataset)
    return ds


def _all(batches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_folder_gives_the_in_memory_images_labels_and_statistics(digits, in_memory, workers):
    ds = _streamed(digits, workers=workers)
    assert ds.workers == workers and ds.num_train == in_memory.num_train == 120
    for key in ("name", "input_shape", "num_classes", "mean", "std", "class_names"):
        assert getattr(ds, key) == getattr(in_memory, key), key  # mean/std bit-equal: the same sums
    x, y = _all(ds.train_batches(32))  # shuffle off: the folder's order
    assert x.dtype == torch.float32 and torch.equal(x, in_memory.train_x.float() / 255)
    assert torch.equal(y, in_memory.train_y)
    x, y = _all(ds.test_batches(7))
    assert torch.equal(x, in_memory.test_x.float() / 255) and torch.equal(y, in_memory.test_y)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_and_search_halves_follow_the_in_memory_order(digits, in_memory, workers):
    ds = _streamed(digits, workers=workers)
    kw = {"shuffle": True, "seed": 3, "drop_last": True}
    mine, ref = ds.train_batches(16, **kw), in_memory.train_batches(16, **kw)
    assert len(mine) == len(ref) == 7
    for _ in range(2):  # two epochs: the generator draws each epoch's order alike
        for (a, ya), (b, yb) in zip(mine, ref, strict=True):
            assert torch.equal(a, b) and torch.equal(ya, yb)
    assert torch.equal(mine.generator.get_state(), ref.generator.get_state())
    for half, ref_half in zip(ds.search_halves(5), in_memory.search_halves(5)):
        assert half.num_train == ref_half.num_train == 60
        x, y = _all(half.train_batches(9))
        assert torch.equal(x, ref_half.train_x.float() / 255) and torch.equal(y, ref_half.train_y)
    skipped = ds.train_batches(16, **kw)  # resume: skip two epochs, then the third epoch matches
    skipped.skip_epochs(2)
    assert torch.equal(next(iter(skipped))[1], next(iter(ref))[1])


def test_abandoned_epoch_then_a_full_one_with_persistent_workers(digits, in_memory):
    """The search zips D_t with D_s, so an epoch's iteration can stop early; the next epoch starts clean."""
    ds = _streamed(digits, workers=2)
    mine = ds.train_batches(10)
    for (_, _), _ in zip(mine, range(2)):
        pass
    x, _ = _all(mine)
    assert torch.equal(x, in_memory.train_x.float() / 255)


def test_greyscale_streams_like_in_memory(digits):
    ref = load_dataset(dataclasses.replace(FOLDER, channels=1), digits)
    ds = _streamed(digits, channels=1)
    assert ds.input_shape == ref.input_shape == (1, 16, 16) and ds.mean == ref.mean
    assert torch.equal(_all(ds.train_batches(50))[0], ref.train_x.float() / 255)


def test_over_the_memory_cap_streams_instead_of_refusing(digits):
    big = load_dataset(dataclasses.replace(FOLDER, max_in_memory_mb=0), digits)
    assert isinstance(big, StreamedDataset) and big.workers == 0
    assert isinstance(load_dataset(FOLDER, digits), Dataset)
    with pytest.raises(BadInput, match="data.stream = true needs data.dataset = folder"):
        load_dataset(DataConfig(dataset="quickstart", stream=True))


def test_a_file_that_does_not_decode_is_named(digits, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(digits, root)
    broken = root / "train" / "five" / "000.png"
    broken.write_bytes(b"not an image")  # PIL cannot identify it: the header scan at load names it
    with pytest.raises(BadInput, match="000.png does not decode"):
        _streamed(root)
    png = (root / "train" / "five" / "001.png").read_bytes()
    broken.write_bytes(png[: len(png) // 2])  # a valid header, truncated pixels: fails in the batch it is in
    ds = _streamed(root, mean=(0.5,) * 3, std=(0.25,) * 3, workers=1)
    with pytest.raises(BadInput, match="000.png does not decode"):
        _all(ds.train_batches(16))


def _recipe(epochs_batch=32):
    recipe = load_recipe("quickstart", TINY)
    data = dataclasses.replace(FOLDER, crop_padding=2, flip=True, cutout=4)
    return dataclasses.replace(
        recipe, data=data, train=dataclasses.replace(recipe.train, batch_size=epochs_batch, epochs=2)
    )


def _fresh(ds, recipe, seed=0):
    torch.manual_seed(seed)
    return build_network(Arch.for_data(recipe.model, ds))


class Interrupt(Reporter):
    """Raises KeyboardInterrupt at the n-th training step."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.lines = n, []

    def advance(self, text: str = "") -> None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt

    def log(self, line: str) -> None:
        self.lines.append(line)


def test_training_on_a_streamed_folder_equals_training_in_memory(digits, in_memory):
    recipe = _recipe()
    ref_model, model = _fresh(in_memory, recipe), _fresh(in_memory, recipe)
    ref = fit(ref_model, in_memory, recipe, CPU)
    got = fit(model, _streamed(digits, workers=1).to(CPU), recipe, CPU)
    assert [dataclasses.replace(m, seconds=0) for m in got] == [dataclasses.replace(m, seconds=0) for m in ref]
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    streamed = _streamed(digits)
    assert evaluate_batches(model, streamed.test_batches(), CPU) == evaluate(
        model, in_memory.test_x, in_memory.test_y, CPU
    )


def test_streamed_training_resumes_exactly(digits, tmp_path):
    """Interrupted in epoch 2 (with augmentation and workers), then resumed: the same weights as without a break."""
    recipe = _recipe()
    ds = _streamed(digits, workers=2)
    ref_model = _fresh(ds, recipe)
    ref = fit(ref_model, ds, recipe, CPU)
    ckpt = tmp_path / "train_state.pt"
    steps = 120 // 32
    with pytest.raises(KeyboardInterrupt):
        fit(_fresh(ds, recipe), ds, recipe, CPU, reporter=Interrupt(steps + 2), checkpoint=ckpt)
    log = Interrupt(10**9)
    model = _fresh(ds, recipe, seed=123)  # the checkpoint's weights replace these
    resumed = fit(model, _streamed(digits, workers=2), recipe, CPU, reporter=log, checkpoint=ckpt)
    assert any("resuming training at epoch 2/2" in line for line in log.lines)
    assert [dataclasses.replace(m, seconds=0) for m in resumed] == [dataclasses.replace(m, seconds=0) for m in ref]
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


FAST = {
    "data.dataset": "folder",
    "data.stream": "true",
    "data.workers": "1",
    "data.flip": "true",
    "model.min_width": "4",
    "model.round_to": "4",
    "search.epochs": "2",
    "search.batch_size": "32",
    "search.sigma": "2.0",
    "train.epochs": "1",
    "train.batch_size": "32",
    "latency.provider": "cpu",
    "latency.threads": "1",
    "latency.samples": "5",
    "latency.holdout": "2",
    "latency.runs": "10",
    "latency.warmup": "2",
    "latency.min_seconds": "0",
    "latency.bake_seconds": "0",
    "latency.repeats": "1",
    "latency.probe": "false",
    "latency.near": "1",
}


def test_search_retrain_export_validate_with_streaming(digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = CliRunner()
    sets = [a for kv in (*TINY, *(f"{k}={v}" for k, v in FAST.items())) for a in ("--set", kv)]
    t0 = time.perf_counter()
    res = cli.invoke(
        app, ["search", "--latency-ms", "2", "--recipe", "quickstart", "--data", str(digits), "--device", "cpu", *sets]
    )
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "latest"
    record = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    assert (run / "model.pt").is_file() and (run / "arch.json").is_file()
    assert "stream = true" in (run / "recipe.toml").read_text()
    res = cli.invoke(app, ["export", "model.onnx"])
    assert res.exit_code == 0, res.output
    res = cli.invoke(
        app,
        ["validate", "model.onnx", "--data", str(digits / "val"), "--report", "r.json"]
        + ["--runs", "5", "--warmup", "1", "--min-seconds", "0"],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["num_test"] == 30 and 0 <= report["accuracy"] <= 1 and report["dataset"] == "folder"
    assert record.get("status", "done") == "done"
    print(f"streamed search -> retrain -> export -> validate in {time.perf_counter() - t0:.1f} s")


@pytest.mark.gpu
def test_streamed_training_on_cuda_uses_pinned_batches(digits):
    ds = _streamed(digits, workers=2).to("cuda")
    batches = ds.train_batches(16)
    assert batches.loader.pin_memory
    x, y = next(iter(batches))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32
    recipe = _recipe()
    history = fit(_fresh(ds, recipe), ds, recipe, torch.device("cuda"), epochs=1)
    assert 0 <= history[0].test_acc <= 1 and history[0].train_loss == history[0].train_loss
